"""A deterministic, linked tri-modal demo corpus (no downloads, a few seconds on one CPU core).

Every protein belongs to a latent family (and one of its 2-3 subfamilies) that shapes all three
modalities, so that tiny encoders can learn to align them in minutes:

* sequence: 2-4 family motifs (+1 per subfamily, ~10% point mutations) at random positions in a
  background drawn from a family-specific amino-acid composition, further biased per residue by
  its secondary structure (helix / strand / loop formers);
* structure: a family secondary-structure layout (helices, strands, loops with family-typical
  lengths; 60-160 residues) laid out as an up-down meander in rows: ideal helices (1.5 Å rise,
  100°/residue, CA radius 2.3 Å) and strands (3.3 Å rise, zig-zag) with family-fixed orientations
  jittered per sample, loops as 3.8 Å-step walks with 100-140° virtual CA angles, all in a random
  global orientation; N, C, O from ideal trans peptide planes turned to keep N-CA-C near 111°;
  per-residue and per-atom Gaussian noise; ~2% of residues miss atoms; about half the samples
  are "predicted" (meta source "demo-predicted", pLDDT, noise growing as pLDDT drops);
* text: family name, function, location, similarity and GO/EC from family vocabulary, phrased
  with several templates; subfamilies add a cofactor sentence and a GO term.

GO ids are fake (a hash of the term name), EC numbers are made up under real class prefixes.
Train and held-out splits share the families but draw distinct samples from different seeded
streams (one per split and family). The same arguments give byte-identical shards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_shards.schema import MODALITIES, Backbone, ProteinRecord
from data_shards.writer import ShardWriter

GENERATOR = "demo_corpus v1"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
HELIX, STRAND, LOOP = 0, 1, 2
_ROW_SPACING = 16.0  # Å between the rows of elements in a fold
_AA = np.frombuffer(AMINO.encode(), dtype=np.uint8)
# UniProtKB background frequencies, AMINO order
_BG = np.array([8.25, 1.37, 5.45, 6.75, 3.86, 7.07, 2.27, 5.96, 5.84, 9.66, 2.42, 4.06, 4.70, 3.93, 5.53, 6.56])
_BG = np.concatenate([_BG, [5.34, 6.87, 1.08, 2.92]]) / 100.0
_SS_BIAS = np.ones((3, 20))  # helix / strand / loop formers are 2.5x more likely in their element
for _ss, _formers in ((HELIX, "AELMQKRH"), (STRAND, "VIYFWTC"), (LOOP, "GPNDSE")):
    _SS_BIAS[_ss, [AMINO.index(c) for c in _formers]] = 2.5


def _table(text: str) -> list:
    """One entry per line: a string, or a tuple of its '|'-separated cells."""
    rows = [tuple(cell.strip() for cell in line.split("|")) for line in text.strip().splitlines()]
    return [row if len(row) > 1 else row[0] for row in rows]


# noun | GO molecular function | EC class prefix ("-": none) | function phrase on {sub}
_ACTIVITIES = _table("""
kinase | protein serine/threonine kinase activity | 2.7.11 | catalyzes the phosphorylation of {sub}
phosphatase | phosphoprotein phosphatase activity | 3.1.3 | catalyzes the dephosphorylation of {sub}
protease | serine-type endopeptidase activity | 3.4.21 | cleaves {sub} at specific peptide bonds
dehydrogenase | oxidoreductase activity, acting on CH-OH donors | 1.1.1 | catalyzes the oxidation of {sub}
acetyltransferase | N-acetyltransferase activity | 2.3.1 | transfers an acetyl group to {sub}
esterase | carboxylic ester hydrolase activity | 3.1.1 | hydrolyzes ester bonds in {sub}
ligase | acid-amino acid ligase activity | 6.3.2 | catalyzes the ATP-dependent ligation of {sub}
isomerase | intramolecular oxidoreductase activity | 5.3.1 | catalyzes the isomerization of {sub}
transporter | transmembrane transporter activity | - | mediates the transport of {sub} across the membrane
transcription factor | DNA-binding transcription factor activity | - | activates transcription of {sub} genes
receptor | signaling receptor activity | - | acts as a receptor for {sub}
chaperone | unfolded protein binding | - | assists the folding of {sub}
methyltransferase | S-adenosylmethionine-dependent methyltransferase activity | 2.1.1 | methylates {sub}
aldolase | aldehyde-lyase activity | 4.1.2 | catalyzes the reversible aldol cleavage of {sub}
GTPase | GTPase activity | 3.6.5 | hydrolyzes GTP to control the assembly of {sub}
oxidase | oxidoreductase activity, acting on CH-NH2 donors | 1.4.3 | catalyzes the deamination of {sub}
""")
_SUBSTRATES = (
    "histone H3; glutamate; pyruvate; fatty acyl-CoA; ribosomal RNA; sugar phosphates; "
    "peptidoglycan precursors; heme; zinc transporters; actin filaments; glycogen; tRNA; sterols; "
    "chitin; ubiquitin conjugates; iron-sulfur clusters"
).split("; ")
_PROCESSES = (
    "glycolytic process; DNA repair; cell wall biogenesis; fatty acid biosynthetic process; "
    "signal transduction; protein folding; iron ion homeostasis; amino acid catabolic process; "
    "cell division; response to oxidative stress; translation; lipid transport; autophagy; "
    "nitrogen fixation; chromatin organization; sporulation"
).split("; ")
# UniProt subcellular location | GO cellular component
_LOCATIONS = _table("""
Cytoplasm | cytoplasm
Nucleus | nucleus
Mitochondrion matrix | mitochondrial matrix
Cell membrane; Multi-pass membrane protein | plasma membrane
Secreted | extracellular region
Endoplasmic reticulum membrane | endoplasmic reticulum membrane
Peroxisome | peroxisome
Plastid, chloroplast stroma | chloroplast stroma
Golgi apparatus | Golgi apparatus
Periplasm | periplasmic space
""")
# cofactor or ligand | GO molecular function
_COFACTORS = _table("""
Mg(2+) | magnesium ion binding
Zn(2+) | zinc ion binding
NAD(+) | NAD binding
FAD | flavin adenine dinucleotide binding
Ca(2+) | calcium ion binding
heme | heme binding
ATP | ATP binding
Fe(2+) | ferrous iron binding
Mn(2+) | manganese ion binding
GTP | GTP binding
pyridoxal 5'-phosphate | pyridoxal phosphate binding
Cu(2+) | copper ion binding
""")
_ORGANISMS = ["Homo sapiens", "Mus musculus", "Escherichia coli (strain K12)", "Saccharomyces cerevisiae"]
_ORGANISMS += ["Arabidopsis thaliana", "Bacillus subtilis"]
_SYLLABLES = "ka lo mer vin tor sa rel du fen gar bi qua zel nor pax ti".split()
_NAME_TEMPLATES = ["{root} {noun}", "{root} {noun} {sub}", "Putative {root} {noun}", "{root}-like {noun} {n}"]
_FUNCTION_TEMPLATES = [
    "{Act}. Involved in {proc}.",
    "Plays a role in {proc}; {act}.",
    "Probable {noun} involved in {proc}; {act}.",
    "{Act}, which is required for {proc}.",
]
_LOCATION_TEMPLATES = ["{loc}.", "{loc} {{ECO:0000250}}.", "{loc}. Note=Enriched there during {proc}."]
_SIMILARITY_TEMPLATES = [
    "Belongs to the {root} family.",
    "Belongs to the {root} family. {sub} subfamily.",
    "Belongs to the {noun} superfamily. {root} family.",
]


def go_id(name: str) -> str:
    """A stable fake GO id for a term name ("GO:00xxxxx"), the same for every seed."""
    return f"GO:00{int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100000:05d}"


# ----------------------------------------------------------------------------- geometry


def _peptide_template() -> dict[str, np.ndarray]:
    """Ideal trans peptide unit CA_i, C_i, O_i, N_i+1, CA_i+1 in its plane (x along CA_i -> CA_i+1).

    Built from N-CA 1.458, CA-C 1.525, C-N 1.329, C=O 1.231 Å; CA-C-N 116.2°, C-N-CA 121.7°,
    CA-C-O 120.5°. C and O are relative to CA_i, N relative to CA_i+1; CA-CA comes out 3.80 Å.
    """
    polar = lambda length, angle: length * np.array([np.cos(angle), np.sin(angle)])
    c = polar(1.525, 0.0)
    heading = np.deg2rad(180 - 116.2)  # turn left at C
    n = c + polar(1.329, heading)
    ca2 = n + polar(1.458, heading - np.deg2rad(180 - 121.7))  # turn right at N: trans
    o = c + polar(1.231, -(np.pi - np.deg2rad(120.5)))  # the other side from N
    x = ca2 / np.linalg.norm(ca2)
    frame = np.stack([x, [-x[1], x[0]]])
    return {"C": frame @ c, "O": frame @ o, "N": frame @ (n - ca2)}


_PEPTIDE = _peptide_template()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def _rotations(axes: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rodrigues: (..., 3) axes and (...) angles -> (..., 3, 3) rotation matrices."""
    a = _unit(axes)
    zero = np.zeros(a.shape[:-1])
    k = np.stack(
        [zero, -a[..., 2], a[..., 1], a[..., 2], zero, -a[..., 0], -a[..., 1], a[..., 0], zero], axis=-1
    ).reshape(*a.shape[:-1], 3, 3)
    angles = np.asarray(angles)[..., None, None]
    return np.eye(3) + np.sin(angles) * k + (1 - np.cos(angles)) * (k @ k)


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 3) uniformly random rotations (from normalised quaternions)."""
    w, x, y, z = _unit(rng.normal(size=(n, 4))).T
    return np.stack(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    ).transpose(2, 0, 1)


def _sse_local(kind: int, n: int) -> np.ndarray:
    """CA trace of an ideal helix or strand along +z, starting at the origin; (n, 3)."""
    t = np.arange(n, dtype=np.float64)
    if kind == HELIX:
        xyz = np.stack([2.3 * np.cos(np.deg2rad(100.0) * t), 2.3 * np.sin(np.deg2rad(100.0) * t), 1.5 * t], 1)
    else:
        xyz = np.stack([0.94 * (-1.0) ** t, np.zeros(n), 3.3 * t], axis=1)
    return xyz - xyz[0]


def _reflect(v: np.ndarray, about: np.ndarray) -> np.ndarray:
    """``v`` mirrored about the line of ``about``: same length, same angle to it. Shapes (..., 3)."""
    axis = _unit(about)
    return 2 * (v * axis).sum(-1, keepdims=True) * axis - v


def backbone_from_ca(ca: np.ndarray, ss: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """Place N, C, O around CA traces with ideal trans peptide planes.

    Each peptide unit CA_i -> CA_i+1 is a rigid ideal plane; only its turn about the CA-CA axis is
    free. Inside helices and strands the turn is fixed relative to the local curvature normal (165°
    and 180°: N-CA-C comes out 109-112° and a helix's O_i - N_i+4 distance 2.9 Å, an H-bond); where
    that gives an N-CA-C angle outside 100-122° (loops, element ends) the turn is solved, residue
    by residue, for 111°. N-CA, CA-C, C-N and C=O lengths are exact for CA-CA = 3.80 Å.

    Shapes:
        ca: (B, W, 3) CA traces padded to W >= 3; ss: (B, W) HELIX / STRAND / LOOP codes;
        lengths: (B,) valid residues per trace, each >= 3 (default W).
        Returns (B, W, 4, 3) atoms N, CA, C, O; positions past a trace's length are garbage.
    """
    batch, width = ca.shape[:2]
    rows = np.arange(batch)
    last = (np.full(batch, width) if lengths is None else np.asarray(lengths)) - 1
    # one virtual CA before and after each trace, bending like the chain next to it
    ext = np.zeros((batch, width + 2, 3))
    ext[:, 1:-1] = ca
    ext[:, 0] = ca[:, 0] - _reflect(ca[:, 2] - ca[:, 1], ca[:, 1] - ca[:, 0])
    tail = _reflect(ca[rows, last - 1] - ca[rows, last - 2], ca[rows, last] - ca[rows, last - 1])
    ext[rows, last + 2] = ca[rows, last] + tail
    bonds = ext[:, 1:] - ext[:, :-1]  # (B, W+1, 3): unit j joins CA_j-1 and CA_j; N_i from unit i
    x = _unit(bonds)
    curl = np.cross(bonds[:, :-1], bonds[:, 1:])  # (B, W, 3): curvature normal at the unit's end
    curl = np.concatenate([curl, curl[:, -1:]], axis=1)
    curl[rows, last + 1] = curl[rows, last]  # the unit after a trace borrows its neighbour's
    y0 = curl - (curl * x).sum(-1, keepdims=True) * x
    flat = np.linalg.norm(y0, axis=-1) < 1e-6  # three CAs on a line: any perpendicular will do
    y0[flat] = np.cross(x[flat], np.eye(3)[np.abs(x[flat]).argmin(-1)])
    y0 = _unit(y0)
    z0 = np.cross(x, y0)
    unit_ss = np.concatenate([ss[:, :1], ss], axis=1)  # unit j takes the type of residue j-1
    preferred = np.deg2rad(np.array([165.0, 180.0, 172.0]))[unit_ss]  # (B, W+1)
    (n0, n1), (c0, c1) = _PEPTIDE["N"], _PEPTIDE["C"]
    scale = np.linalg.norm(_PEPTIDE["N"]) * np.linalg.norm(_PEPTIDE["C"])
    target, lo, hi = np.cos(np.deg2rad([111.0, 100.0, 122.0])) * scale  # |N-CA| |C-CA| cos(N-CA-C)

    frame = lambda i, turn: np.cos(turn)[:, None] * y0[:, i] + np.sin(turn)[:, None] * z0[:, i]

    def solve(fixed: np.ndarray, template: np.ndarray, i: int, turn: np.ndarray) -> np.ndarray:
        # turn of unit i putting the angle between ``fixed`` (the other bond of the residue) and
        # the bond ``template`` places from unit i at 111°: of the two exact solutions (or the
        # best reachable one) the nearest to ``turn``; ``turn`` itself while it is within 100-122°
        a = template[0] * (fixed * x[:, i]).sum(-1)
        b, d = template[1] * (fixed * y0[:, i]).sum(-1), template[1] * (fixed * z0[:, i]).sum(-1)
        dot = a + b * np.cos(turn) + d * np.sin(turn)
        spread = np.arccos(np.clip((target - a) / (np.hypot(b, d) + 1e-9), -1, 1))
        options = np.arctan2(d, b)[:, None] + np.stack([spread, -spread], axis=1)
        nearest = options[rows, np.abs(np.angle(np.exp(1j * (options - turn[:, None])))).argmin(1)]
        return np.where((dot > lo) | (dot < hi), nearest, turn)

    y = np.empty_like(x)
    y[:, 1] = frame(1, preferred[:, 1])
    c_vec = c0 * x[:, 1] + c1 * y[:, 1]  # residue 0: solve the virtual unit before it backwards
    y[:, 0] = frame(0, solve(c_vec, _PEPTIDE["N"], 0, preferred[:, 0]))
    for i in range(1, width):  # residue i: N_i from unit i (set), C_i from unit i+1 (chosen now)
        n_vec = n0 * x[:, i] + n1 * y[:, i]
        y[:, i + 1] = frame(i + 1, solve(n_vec, _PEPTIDE["C"], i + 1, preferred[:, i + 1]))
    place = lambda atom: _PEPTIDE[atom][0] * x + _PEPTIDE[atom][1] * y  # (B, W+1, 3)
    return np.stack([ca + place("N")[:, :-1], ca, ca + place("C")[:, 1:], ca + place("O")[:, 1:]], axis=2)


# ----------------------------------------------------------------------------- families


def _make_family(index: int, root: str, combo: int, rng: np.random.Generator) -> dict:
    act_i, sub_i, proc_i = combo // 256, (combo // 16) % 16, combo % 16
    noun, act_go, ec_prefix, act_phrase = _ACTIVITIES[act_i]
    loc, loc_go = _LOCATIONS[rng.integers(len(_LOCATIONS))]
    term = lambda name, aspect: {"id": go_id(name), "aspect": aspect, "name": name}
    go = [term(act_go, "F"), term(_PROCESSES[proc_i], "P"), term(loc_go, "C")]
    cofactors = rng.permutation(len(_COFACTORS))
    if rng.random() < 0.5:
        go.append(term(_COFACTORS[cofactors[0]][1], "F"))
    comp = 0.5 * _BG + 0.5 * rng.dirichlet(np.full(20, 0.7))
    probs = comp * _SS_BIAS
    motifs = [rng.integers(0, 20, size=rng.integers(5, 11)) for _ in range(rng.integers(2, 5))]
    subfamilies = [
        {
            "code": f"FAM{index:03d}-{letter}",
            "letter": letter,
            "motif": rng.integers(0, 20, size=rng.integers(5, 9)),
            "slot": int(rng.integers(0, len(motifs) + 1)),
            "cofactor": _COFACTORS[cofactors[1 + s]][0],
            "go": term(_COFACTORS[cofactors[1 + s]][1], "F"),
        }
        for s, letter in enumerate("ABC"[: rng.integers(2, 4)])
    ]
    # secondary-structure layout: elements go up, down, up, ... side by side in rows of a few
    # (a meander folded into layers), so that the chain does not run through itself
    fold = ("alpha", "beta", "alpha/beta")[rng.integers(3)]
    target = int(rng.integers(80, 136))
    segments = [[LOOP, int(rng.integers(2, 5))]]
    while sum(n for _, n in segments) < target - 8:
        kind = HELIX if fold == "alpha" else STRAND if fold == "beta" else (HELIX, STRAND)[rng.integers(2)]
        length = int(rng.integers(10, 19) if kind == HELIX else rng.integers(5, 10))
        segments += [[kind, length], [LOOP, int(rng.integers(6, 10))]]
    params, per_row, loops, flips = [], int(rng.integers(3, 5)), 0, 0
    for i, (kind, length) in enumerate(segments):
        if kind == LOOP:  # a walk to the next element's place: along the row, or on to the next row
            row, col = divmod(loops, per_row)
            across = col == 0 and row > 0
            if across:  # rows 15-20 Å apart
                length = segments[i][1] = max(length, 7)
            lateral = np.array([0.0, 1.0, 0.0]) if across else np.array([(-1.0) ** row, 0, 0])
            wiggle = 0.35 * rng.normal(size=(length, 3)) * np.array([0.0, 1, 1] if across else [1.0, 0, 1])
            params.append((_unit(lateral + wiggle), _ROW_SPACING * row))  # step goals, the row's y
            loops += 1
        else:  # tilted by up to 5° within its row, spun about its own axis
            flip = _rotations(np.array([1.0, 0, 0]), np.pi * (flips % 2))
            spin = _rotations(np.array([0, 0, 1.0]), rng.uniform(0, 2 * np.pi))
            tilt = _rotations(np.array([0, 1.0, 0]), np.deg2rad(rng.uniform(-5, 5)))
            params.append(tilt @ flip @ spin)
            flips += 1
    return {
        "code": f"FAM{index:03d}",
        "root": root,
        "noun": noun,
        "act": act_phrase.format(sub=_SUBSTRATES[sub_i]),
        "process": _PROCESSES[proc_i],
        "location": loc,
        "ec": f"{ec_prefix}.{rng.integers(1, 120)}" if ec_prefix != "-" else None,
        "go": go,
        "cdf": np.cumsum(probs / probs.sum(1, keepdims=True), axis=1),  # (3, 20) per element type
        "motifs": motifs,
        "subfamilies": subfamilies,
        "segments": segments,
        "segment_params": params,  # loop: ((n, 3) step goals, row y); helix/strand: (3, 3) rotation
        "organism": int(rng.integers(len(_ORGANISMS))),
        "plddt_offset": float(rng.normal(0, 3)),
    }


def make_families(num_families: int, seed: int) -> list[dict]:
    """The latent families of a seed (shared by every split)."""
    if not 1 <= num_families <= len(_ACTIVITIES) * 256:
        raise ValueError(f"num_families must be in [1, {len(_ACTIVITIES) * 256}], got {num_families}")
    rng = np.random.default_rng([seed, 1])
    roots: list[str] = []
    while len(roots) < num_families:
        root = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))).capitalize()
        root += ("in", "ase", "on")[rng.integers(3)]
        if root not in roots:
            roots.append(root)
    combos = rng.choice(len(_ACTIVITIES) * 256, size=num_families, replace=False)
    return [_make_family(i, roots[i], int(c), rng) for i, c in enumerate(combos)]


# ----------------------------------------------------------------------------- samples


def _turn(heading: np.ndarray, goal: np.ndarray, rng: np.random.Generator, bend=None) -> np.ndarray:
    """Next CA-CA direction: as close to ``goal`` as a virtual CA angle of 100-140° allows.

    ``bend`` (3,) picks the side to turn to when the goal is straight ahead (loops zig-zag in the
    plane of their goal and ``bend``, instead of drifting sideways); the dihedral gets ~17° noise.
    Shapes: heading, goal (n, 3) -> (n, 3) unit vectors.
    """
    side = goal - (goal * heading).sum(-1, keepdims=True) * heading
    if bend is not None:
        side = side + 0.5 * (bend - (heading @ bend)[:, None] * heading)
    side = _unit(side + 1e-3 * rng.normal(size=side.shape))
    spin = rng.normal(0, 0.3, size=(len(side), 1))
    side = np.cos(spin) * side + np.sin(spin) * np.cross(heading, side)
    turn = np.deg2rad(rng.uniform(40, 80, size=(len(side), 1)))  # 180° - the CA angle
    return _unit(np.cos(turn) * heading + np.sin(turn) * side)


def _family_structures(fam: dict, n: int, rng: np.random.Generator):
    """n CA traces of one family, padded: ca (n, W, 3), ss (n, W), lengths (n,)."""
    segments, params, rows = fam["segments"], fam["segment_params"], np.arange(n)
    # per-sample element orientations: the family's, jittered by ~5°; loops get a zero axis
    rotations = [
        _rotations(rng.normal(size=(n, 3)), rng.normal(0, 0.08, size=n)) @ param if kind != LOOP else None
        for (kind, _), param in zip(segments, params)
    ]
    # element axes; the trailing zero also serves axes[-1] for the first loop and the last loop's next
    axes = [np.zeros((n, 3)) if r is None else r[..., 2] for r in rotations] + [np.zeros((n, 3))]
    pieces, valid, kinds = [], [], []
    end, heading = np.zeros((n, 3)), np.tile(params[0][0][0], (n, 1))  # last CA, last CA-CA direction
    for k, ((kind, length), param) in enumerate(zip(segments, params)):
        if kind == LOOP:  # leave along the previous element's axis, arrive along the next one's
            ramp = np.array([0.5, 0.2] + [0.0] * length)[:length, None]
            goals = param[0] + ramp * axes[k - 1][:, None] + ramp[::-1] * axes[k + 1][:, None]
            xyz = np.empty((n, length, 3))
            for t in range(length):
                goal = goals[:, t] + 0.15 * rng.normal(size=(n, 3))
                goal[:, 1] += np.clip(0.15 * (param[1] - end[:, 1]), -1, 1)  # back towards the row
                heading = _turn(heading, goal, rng, bend=np.array([0.0, 0.0, (-1.0) ** t]))
                end = xyz[:, t] = end + 3.8 * heading
            sizes = np.full(n, length)
        else:  # one residue longer or shorter per sample
            sizes = np.maximum(4, length + rng.integers(-1, 2, size=n))
            local = np.einsum("nij,lj->nli", rotations[k], _sse_local(kind, length + 1))
            xyz = local + (end + 3.8 * _turn(heading, axes[k], rng))[:, None]
            heading = _unit(xyz[rows, sizes - 1] - xyz[rows, sizes - 2])
        pieces.append(xyz)
        valid.append(np.arange(xyz.shape[1]) < sizes[:, None])
        kinds.append(np.full(xyz.shape[1], kind))
        end = xyz[rows, sizes - 1]
    xyz, valid, kinds = np.concatenate(pieces, 1), np.concatenate(valid, 1), np.concatenate(kinds)
    order = np.argsort(~valid, axis=1, kind="stable")  # valid residues first, in chain order
    ca, ss, lengths = np.take_along_axis(xyz, order[..., None], 1), kinds[order], valid.sum(1)
    inside = np.arange(ca.shape[1]) < lengths[:, None]
    centre = (ca * inside[..., None]).sum(1) / lengths[:, None]
    ca = np.einsum("nij,nlj->nli", _random_rotations(rng, n), ca - centre[:, None])
    return ca, np.where(inside, ss, LOOP), lengths


def _insert_motifs(fam: dict, residues: np.ndarray, lengths: np.ndarray, subs: np.ndarray, rng) -> None:
    """Write each sample's family + subfamily motifs (in family order, ~10% point mutations) at
    random non-overlapping places into ``residues`` (n, W) in place; ``subs`` picks subfamilies."""
    layouts = []
    for sub in fam["subfamilies"]:
        motifs = list(fam["motifs"])
        motifs.insert(sub["slot"], sub["motif"])
        layouts.append(motifs)
    sizes = np.array([[len(m) for m in motifs] for motifs in layouts])  # (S, k)
    width = sizes.sum(1).max()
    values, which, within = (np.zeros((len(layouts), width), dtype=int) for _ in range(3))
    valid = np.arange(width) < sizes.sum(1)[:, None]
    for s, motifs in enumerate(layouts):
        total = sizes[s].sum()
        values[s, :total] = np.concatenate(motifs)
        which[s, :total] = np.repeat(np.arange(len(motifs)), sizes[s])
        within[s, :total] = np.arange(total) - np.repeat(np.cumsum(sizes[s]) - sizes[s], sizes[s])
    n, k = len(subs), sizes.shape[1]
    free = lengths - sizes[subs].sum(1)
    starts = np.sort(rng.integers(0, free[:, None] + 1, size=(n, k)), axis=1) + np.cumsum(sizes[subs], 1)
    starts -= sizes[subs]  # motif j starts after its gap and the motifs before it
    positions = np.take_along_axis(starts, which[subs], axis=1) + within[subs]
    mutated = np.where(rng.random((n, width)) < 0.1, rng.integers(0, 20, (n, width)), values[subs])
    rows, cols = np.nonzero(valid[subs])
    residues[rows, positions[rows, cols]] = mutated[rows, cols]


def _text(fam: dict, sub: dict, rng: np.random.Generator) -> dict:
    act = fam["act"]
    fill = dict(root=fam["root"], noun=fam["noun"], sub=sub["letter"], n=int(rng.integers(1, 4)), act=act)
    fill.update(Act=act[0].upper() + act[1:], proc=fam["process"], loc=fam["location"])
    pick = lambda templates: templates[rng.integers(len(templates))].format(**fill)
    function = pick(_FUNCTION_TEMPLATES)
    if rng.random() < 0.8:
        function += (" Requires {} as cofactor." if rng.random() < 0.5 else " Binds {}.").format(sub["cofactor"])
    go = [t for t in fam["go"] + [sub["go"]] if rng.random() > 0.1] or [sub["go"]]
    return {
        "name": pick(_NAME_TEMPLATES),
        "function": function,
        "location": pick(_LOCATION_TEMPLATES),
        "similarity": pick(_SIMILARITY_TEMPLATES),
        "go": [dict(t) for t in {t["id"]: t for t in go}.values()],
        "ec": [fam["ec"]] if fam["ec"] and rng.random() > 0.1 else [],
    }


def family_records(fam: dict, ids: list[str], rng: np.random.Generator, missing_rate: float = 0.0):
    """Records for ``ids``, all of family ``fam``, drawn (vectorised) from ``rng``."""
    n = len(ids)
    ca, ss, lengths = _family_structures(fam, n, rng)
    width = ca.shape[1]
    ends = np.minimum(np.arange(width), lengths[:, None] - 1 - np.arange(width))
    plddt = np.array([91.0, 87.0, 72.0])[ss] + fam["plddt_offset"] + rng.normal(0, 4, (n, width))
    plddt = np.clip(plddt - 3.0 * np.maximum(5 - ends, 0), 25, 98.5)
    predicted = rng.random(n) < 0.5
    # noise: a shift per residue (bond lengths inside a residue survive) plus a little per atom
    sigma = np.where(predicted[:, None], 0.03 + 0.004 * (100 - plddt), 0.08)[..., None, None]
    coords = backbone_from_ca(ca, ss, lengths) + rng.normal(size=(n, width, 1, 3)) * sigma
    coords += rng.normal(0, 0.02, size=coords.shape)
    mask = ~((rng.random((n, width)) < 0.02)[..., None] & (rng.random((n, width, 4)) < 0.5))
    coords = np.where(mask[..., None], coords, 0.0).astype(np.float32)
    background = np.minimum((rng.random((n, width))[..., None] > fam["cdf"][ss]).sum(-1), 19)  # (n, W)
    drop, subs = rng.random(n), rng.integers(0, len(fam["subfamilies"]), n)
    _insert_motifs(fam, background, lengths, subs, rng)
    sequences = _AA[background]  # (n, W) ascii codes
    records = []
    for i, record_id in enumerate(ids):
        length, sub = lengths[i], fam["subfamilies"][subs[i]]
        backbone = Backbone(coords[i, :length], mask[i, :length], None)
        if predicted[i]:
            backbone.plddt = plddt[i, :length].astype(np.float32)
        organism = fam["organism"] if rng.random() < 0.7 else int(rng.integers(len(_ORGANISMS)))
        meta = {
            "source": "demo-predicted" if predicted[i] else "demo",
            "evidence": int(rng.choice(5, p=[0.3, 0.3, 0.2, 0.1, 0.1])) + 1,
            "organism": _ORGANISMS[organism],
            "family": fam["code"],
            "subfamily": sub["code"],
        }
        record = ProteinRecord(
            id=record_id,
            sequence=sequences[i, :length].tobytes().decode(),
            backbone=None if drop[i] < missing_rate / 2 else backbone,
            text=None if missing_rate / 2 <= drop[i] < missing_rate else _text(fam, sub, rng),
            meta=meta,
        )
        records.append(record)
    return records


def build_demo_corpus(
    out_dir: str | Path,
    num_train: int = 3200,
    num_heldout: int = 800,
    samples_per_shard: int = 400,
    num_families: int = 32,
    seed: int = 0,
    missing_rate: float = 0.05,
) -> dict:
    """Write the demo corpus to ``out_dir/train`` and ``out_dir/heldout`` (shards + manifests).

    Families are balanced within a split (sample i gets family ``perm[i] % num_families`` for a
    seeded permutation); existing demo shards in those directories are replaced.

    Args:
        out_dir: root directory of the corpus.
        num_train, num_heldout: samples per split.
        samples_per_shard: samples per tar.
        num_families: latent families (shared by both splits).
        seed: everything derives from it; the same arguments give byte-identical files.
        missing_rate: fraction of *train* samples lacking their structure (half of them) or their
            text (the other half), to exercise missing-modality handling; held-out samples are
            always complete.

    Returns:
        {"out_dir", "seed", "num_families", "splits": {"train": {"dir", "num_samples",
        "num_shards", "modalities"}, "heldout": {...}}}
    """
    out_dir = Path(out_dir)
    families = make_families(num_families, seed)
    summary = {"out_dir": str(out_dir), "seed": seed, "num_families": num_families, "splits": {}}
    for split_index, (split, tag, count) in enumerate((("train", "TR", num_train), ("heldout", "HO", num_heldout))):
        order = np.random.default_rng([seed, 2, split_index]).permutation(np.arange(count) % num_families)
        rate = missing_rate if split == "train" else 0.0
        slots: list[ProteinRecord | None] = [None] * count
        for f, fam in enumerate(families):
            where = np.flatnonzero(order == f)
            rng = np.random.default_rng([seed, 3, split_index, f])
            for i, record in zip(where, family_records(fam, [f"DEMO_{tag}_{i:06d}" for i in where], rng, rate)):
                slots[i] = record
        extra = {"split": split, "seed": seed, "generator": GENERATOR, "num_families": num_families}
        with ShardWriter(out_dir / split, samples_per_shard=samples_per_shard, extra=extra, overwrite=True) as w:
            for record in slots:
                w.write(record)
        summary["splits"][split] = {
            "dir": str(out_dir / split),
            "num_samples": w.num_samples,
            "num_shards": len(w.shard_infos),
            "modalities": {m: sum(s.modalities[m] for s in w.shard_infos) for m in MODALITIES},
        }
    return summary
