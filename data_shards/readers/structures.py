"""Protein structures (PDB / mmCIF, plain or gzipped) → per-chain sequence and backbone, with gemmi.

:func:`read_structure` reads a file; :func:`read_structure_bytes` reads the same file's bytes held in
memory (an archive member, an object on object storage) under its file name, with the same result.

What is read:

* the format comes from the content, not the name: gzip by its magic bytes, mmCIF by its
  ``data_`` block header, anything else as PDB, so foldseek's ``d3g46a_.gz`` (gzipped PDB without
  an extension) and ``.ent.gz`` files read like any other;
* model 1 only; the first alternate location of every atom (and of point mutations);
* per chain, the observed amino-acid residues in file order (see :func:`_residue_letter`): standard
  residues by their letter, modified residues by their parent (MSE → M, SEP → S, ...), other
  amino-acid residues (not in gemmi's table but carrying N, CA and C) as X; waters, ions and
  ligands are not part of the chain. A residue counts as
  observed when its CA is (residues with only stray side-chain or N atoms carry no usable backbone;
  this is also the convention of ``pdb_chains.tsv``). HETATM residues after the chain's last ATOM
  residue are ligands (a free amino acid, SAH ...) and are left out, modified amino acids excepted;
* N, CA, C, O of each residue, with ``atom_mask`` False for missing atoms (coordinates 0);
* pLDDT from the B-factor column of CA (else the residue's first atom) for predicted models
  (AlphaFold: a title naming ALPHAFOLD or a file name starting with ``AF-``).

Distinct chains are never merged. Some files reuse one chain id for two molecules (a second
chain A after a TER record and another chain, or residue numbers that start again); reading them
as one chain would splice two sequences and two backbones. Such a chain id is left out and listed
in ``StructureFile.ambiguous`` with the reason (see :func:`_ambiguous_chains`). What counts as one
chain: the amino-acid ATOM residues of one TER-delimited segment (PDB) or one ``label_asym_id``
(mmCIF). A PDB chain id whose next segment directly follows the previous one (only a TER between
them) and continues its residue numbering is one chain with a break (some programs write TER at
gaps); any other reuse is ambiguous, and so is a residue number (with insertion code) that occurs
twice among a chain's residues. Ligands and free amino acids (HETATM after the chain), waters and
alternate locations are not segments.

Real files are messy: old PDB files carry segment ids and line numbers in columns 73-80, and gemmi
rejects some of those as charges ("Wrong format for charge"). Charges do not matter for a backbone,
so on that error the PDB text is re-read with columns 79-80 of ATOM/HETATM lines blanked.

Why gemmi: a maintained C++ parser that handles PDB and mmCIF alike (including the odd layouts of
old files), altlocs, microheterogeneity and modified-residue tables, and reads a structure in
about a millisecond, an order of magnitude faster than Biopython's pure-Python parser.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from data_shards.schema import BACKBONE_ATOMS, Backbone

# file names that look like coordinate files (after stripping .gz); names without any dot count too
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb1", ".pdb2", ".pdb3", ".pdb4")
MAX_STRUCTURE_BYTES = 512 << 20  # refuse decompressed files beyond this (a gzip bomb guard)
_AA_KINDS = {gemmi.ResidueKind.AA, gemmi.ResidueKind.AAD}


class StructureError(ValueError):
    """A structure file cannot be read; the message names the file."""


@dataclass
class StructureChain:
    """One protein chain of a structure.

    Attributes:
        chain: author chain id.
        sequence: one letter per observed residue (parents for modified residues, X otherwise).
        backbone: N/CA/C/O coordinates, atom mask and (for predicted models) pLDDT; len == len(sequence).
        num_modified: residues read through a parent (MSE → M ...).
        num_unknown: residues written as X.
    """

    chain: str
    sequence: str
    backbone: Backbone
    num_modified: int = 0
    num_unknown: int = 0


@dataclass
class StructureFile:
    """A parsed structure file.

    Attributes:
        path: the file read.
        format: "pdb" or "mmcif".
        pdb_id: the entry id from the header ("" when the file has none).
        title: the title record ("" when absent).
        predicted: True for predicted models (pLDDT is then set on every chain).
        chains: protein chains in file order (chains without amino-acid residues are left out).
        other_chains: ids of chains present in model 1 without any amino-acid residue (DNA, ligands).
        ambiguous: {chain id: reason} for ids used by two different chains; they are not in ``chains``.
        repaired: notes on what had to be fixed to read the file (e.g. "blanked charge columns").
    """

    path: str
    format: str
    pdb_id: str
    title: str
    predicted: bool
    chains: list[StructureChain] = field(default_factory=list)
    other_chains: list[str] = field(default_factory=list)
    ambiguous: dict[str, str] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)

    def chain(self, chain_id: str) -> StructureChain | None:
        """The chain with author id ``chain_id``, or None."""
        for chain in self.chains:
            if chain.chain == chain_id:
                return chain
        return None


def looks_like_structure_file(path: str | Path) -> bool:
    """True when the name suggests coordinates: ``.pdb``/``.ent``/``.cif`` (gzipped or not), or a
    gzipped file with no other suffix (foldseek/SCOP ``d3g46a_.gz``). Used when scanning folders;
    files named explicitly are always read."""
    name = Path(path).name.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    if name.startswith(".") or not name:
        return False
    return name.endswith(STRUCTURE_SUFFIXES) or (gzipped and "." not in name)


def _read_file(path: Path) -> bytes:
    """The first ``MAX_STRUCTURE_BYTES + 1`` bytes of the file (enough to tell it is too large)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_STRUCTURE_BYTES + 1)
    except OSError as exc:
        raise StructureError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def _contents(data: bytes, where: str | Path) -> bytes:
    """The coordinate text's bytes: ``data`` gunzipped when it starts with gzip's magic bytes;
    StructureError naming ``where`` when it is truncated, too large or empty."""
    try:
        if data[:2] == b"\x1f\x8b":
            # a gzip file may hold several members (bgzip, pigz -i, cat a.gz b.gz): read them all
            out, rest = bytearray(), data
            while rest and len(out) <= MAX_STRUCTURE_BYTES:
                inflater = zlib.decompressobj(wbits=47)  # gzip (and zlib) container
                out += inflater.decompress(rest, MAX_STRUCTURE_BYTES + 1 - len(out))
                if not inflater.eof:
                    if len(out) <= MAX_STRUCTURE_BYTES:
                        raise StructureError(f"{where}: truncated gzip stream")
                    break
                rest = inflater.unused_data
                if rest[:2] != b"\x1f\x8b":
                    if rest.strip(b"\x00"):
                        raise StructureError(f"{where}: trailing garbage after the gzip stream")
                    break
            data = bytes(out)
    except (OSError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
        raise StructureError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    if len(data) > MAX_STRUCTURE_BYTES:
        raise StructureError(f"{where}: more than {MAX_STRUCTURE_BYTES} bytes of coordinates")
    if not data.strip():
        raise StructureError(f"{where}: empty file")
    return data


def _is_mmcif(text: str) -> bool:
    for line in text[:65536].splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped.startswith("data_")
    return False


def _blank_charge_columns(text: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if len(line) > 78 and line.startswith(("ATOM  ", "HETATM")):
            lines[i] = line[:78] + "  " + line[80:]
    return "\n".join(lines) + "\n"


def _parse(where: str | Path, text: str) -> tuple[gemmi.Structure, str, list[str]]:
    repaired: list[str] = []
    try:
        if _is_mmcif(text):
            block = gemmi.cif.read_string(text).sole_block()
            return gemmi.make_structure_from_block(block), "mmcif", repaired
        # one chain part per TER-delimited segment, so that a reused chain id stays visible
        try:
            return gemmi.read_pdb_string(text, split_chain_on_ter=True), "pdb", repaired
        except (RuntimeError, ValueError) as exc:
            if "charge" not in str(exc).lower():
                raise
            repaired.append(f"blanked charge columns 79-80 ({exc})")
            return gemmi.read_pdb_string(_blank_charge_columns(text), split_chain_on_ter=True), "pdb", repaired
    except (RuntimeError, ValueError, IndexError) as exc:
        raise StructureError(f"{where}: cannot parse ({exc})") from None


_TABULATED: dict[str, tuple[str, str] | None | bool] = {}  # residue name -> letter/kind (cached)
_ATOM_INDEX = {name: j for j, name in enumerate(BACKBONE_ATOMS)}


def _tabulated_letter(name: str) -> tuple[str, str] | None | bool:
    """(letter, kind) from gemmi's residue table, None for non-amino acids, False when not tabulated."""
    if name not in _TABULATED:
        info = gemmi.find_tabulated_residue(name)
        if info is None or not info.found() or info.kind == gemmi.ResidueKind.UNKNOWN:
            _TABULATED[name] = False
        elif info.is_water() or info.kind not in _AA_KINDS:
            _TABULATED[name] = None
        else:
            code = info.one_letter_code
            if code.isupper() and info.is_standard() and code != "X":
                _TABULATED[name] = (code, "standard")
            elif code.isalpha() and code.upper() != "X":
                _TABULATED[name] = (code.upper(), "modified")
            else:
                _TABULATED[name] = ("X", "unknown")
    return _TABULATED[name]


def _residue_letter(residue: gemmi.Residue, backbone: dict) -> tuple[str, str] | None:
    """(letter, kind) for an amino-acid residue, kind in {"standard", "modified", "unknown"}; else None."""
    letter = _tabulated_letter(residue.name)
    if letter is False:  # not in gemmi's table: an amino acid if it carries a backbone
        return ("X", "unknown") if {"N", "CA", "C"} <= backbone.keys() else None
    return letter


def _backbone_atoms(residue: gemmi.Residue) -> dict:
    """{atom name: gemmi.Atom} of the residue's first N, CA, C and O."""
    backbone = {}
    for atom in residue:
        if atom.name in _ATOM_INDEX and atom.name not in backbone:
            backbone[atom.name] = atom
    return backbone


def _chain_residues(chain: gemmi.Chain) -> list[tuple[str, str, str, dict, tuple[int, str]]]:
    """[(letter, kind, het_flag, {atom name: gemmi.Atom}, (author residue number, insertion code))]
    of the observed amino-acid residues."""
    picked = []
    for residue in chain:
        backbone = _backbone_atoms(residue)
        if "CA" not in backbone:
            continue
        letter = _residue_letter(residue, backbone)
        if letter is not None:
            picked.append((*letter, residue.het_flag, backbone, (residue.seqid.num, residue.seqid.icode.strip())))
    # HETATM residues after the chain's last ATOM residue are ligands (a free amino acid, SAH...)
    # unless they are modified amino acids (a C-terminal MSE)
    last_atom = max((i for i, item in enumerate(picked) if item[2] == "A"), default=-1)
    return [item for i, item in enumerate(picked) if not (i > last_atom and item[2] == "H" and item[1] != "modified")]


def _polymer_segments(model: gemmi.Model, fmt: str) -> list[tuple[str, str, list[int]]]:
    """[(chain id, segment, author numbers)] in file order: the amino-acid ATOM residues of each
    chain part (a TER-delimited segment in PDB) or, in mmCIF, of each label_asym_id."""
    segments = []
    for index, chain in enumerate(model):
        by_key: dict[str, list[int]] = {}
        for residue in chain:
            if residue.het_flag != "A":
                continue  # ligands, free amino acids and waters are HETATM
            backbone = _backbone_atoms(residue)
            if "CA" in backbone and _residue_letter(residue, backbone) is not None:
                key = residue.subchain if fmt == "mmcif" else f"part {index}"
                by_key.setdefault(key, []).append(residue.seqid.num)
        segments += [(chain.name, key, numbers) for key, numbers in by_key.items()]
    return segments


def _ambiguous_chains(model: gemmi.Model, fmt: str) -> dict[str, str]:
    """{chain id: reason} for ids that name more than one polymer chain (see the module docstring);
    call before ``merge_chain_parts``."""
    segments = _polymer_segments(model, fmt)
    out: dict[str, str] = {}
    seen: dict[str, tuple[int, str, int]] = {}  # chain id -> (position, segment, highest number)
    for position, (name, key, numbers) in enumerate(segments):
        if name in seen and name not in out:
            last, last_key, highest = seen[name]
            if fmt == "mmcif":
                out[name] = f"chain {name} holds two polymer chains (label_asym_id {last_key} and {key})"
            elif last != position - 1:
                between = segments[position - 1][0]
                out[name] = f"chain id {name} used again after chain {between} (from residue {numbers[0]})"
            elif numbers[0] <= highest:
                out[name] = f"chain {name} starts again after TER (residue {highest}, then {numbers[0]})"
        highest = max(numbers) if name not in seen else max(seen[name][2], max(numbers))
        seen[name] = (position, key, highest)
    return out


def _repeated_residues(model: gemmi.Model) -> dict[str, str]:
    """{chain id: reason} for chains where one author residue number (with insertion code) names
    two residues, or one residue holds a backbone atom twice; call before removing alternate locations,
    which would silently keep the first copy. Two residues under one number whose atoms carry
    alternate locations are microheterogeneity (point-mutation variants), not a repeat."""
    out: dict[str, str] = {}
    seen: dict[str, set[tuple[int, str]]] = {}
    for chain in model:
        numbers = seen.setdefault(chain.name, set())
        for residue in chain:
            backbone = _backbone_atoms(residue)
            letter = _residue_letter(residue, backbone) if "CA" in backbone else None
            if letter is None or (residue.het_flag != "A" and letter[1] != "modified"):
                continue  # not a residue of the polymer (ligand, free amino acid, water)
            number = (residue.seqid.num, residue.seqid.icode.strip())
            variant = any(atom.altloc != "\0" for atom in residue)
            # two copies of a residue read as one: a backbone atom twice (hydrogens of old files
            # are often named alike, so only N, CA, C, O count)
            atoms = [(atom.name, atom.altloc) for atom in residue if atom.name in _ATOM_INDEX]
            if (number in numbers and not variant) or len(set(atoms)) < len(atoms):
                out.setdefault(chain.name, f"residue number {number[0]}{number[1]} occurs twice in chain {chain.name}")
            numbers.add(number)
    return out


def _is_predicted(path: Path, title: str) -> bool:
    return "ALPHAFOLD" in title.upper() or Path(path).name.startswith("AF-")


def read_structure(path: str | Path, plddt: str = "auto", chains: set[str] | None = None) -> StructureFile:
    """Read model 1 of a PDB or mmCIF file (plain or gzipped) into protein chains.

    Args:
        path: the file.
        plddt: "auto" (pLDDT from B-factors for predicted models only), "always" or "never".
        chains: read only these author chain ids (default: all).

    Returns:
        The :class:`StructureFile`; chains without amino-acid residues are left out, chain ids
        used by two different chains are listed in ``ambiguous`` instead of ``chains``.

    Raises:
        StructureError: unreadable, truncated, empty or unparsable file, or no model in it.
    """
    path = Path(path)
    return _read(_contents(_read_file(path), path), path, path, plddt, chains)


def read_structure_bytes(
    data: bytes, name: str, plddt: str = "auto", chains: set[str] | None = None, where: str | None = None
) -> StructureFile:
    """Read a structure file held in memory (an archive member, an object) exactly as
    :func:`read_structure` reads the file ``name`` with these bytes; nothing is written to disk.

    Args:
        data: the file's bytes, plain or gzipped (told by the content, as for a path).
        name: the file's name (``AF-P12345-F1-model_v4.pdb.gz``, a folder part is ignored): it tells
            AlphaFold models, as the path does for :func:`read_structure`.
        plddt, chains: as for :func:`read_structure`.
        where: what messages and ``StructureFile.path`` call the file (``archive.tar:member``);
            default ``name``.

    Returns:
        The same :class:`StructureFile` as :func:`read_structure` on a file of these bytes named
        ``name``, with ``path`` set to ``where``.

    Raises:
        StructureError: naming ``where``, for the same files as :func:`read_structure`.
    """
    where = name if where is None else where
    return _read(_contents(data[: MAX_STRUCTURE_BYTES + 1], where), Path(name), where, plddt, chains)


def _read(data: bytes, path: Path, where: str | Path, plddt: str, chains: set[str] | None) -> StructureFile:
    """The :class:`StructureFile` of the (decompressed) bytes of the file ``path``; ``where`` names
    it in messages and in ``StructureFile.path``."""
    text = data.decode("utf-8", errors="replace")
    structure, fmt, repaired = _parse(where, text)
    # gemmi returns one empty model for text without any ATOM/HETATM record (an HTML error page,
    # a header-only file): that is not a structure
    if len(structure) == 0 or not any(len(residue) for chain in structure[0] for residue in chain):
        raise StructureError(f"{where}: no model with atoms (not a PDB/mmCIF coordinate file?)")
    # before altlocs are removed (which keeps the first of two residues with one number) and
    # before the parts of one chain id are merged
    ambiguous = {**_repeated_residues(structure[0]), **_ambiguous_chains(structure[0], fmt)}
    structure.remove_alternative_conformations()  # keep the first altloc (and residue variant)
    structure.merge_chain_parts()  # e.g. waters listed as a second "chain A" after chain B
    info = dict(structure.info)
    title = info.get("_struct.title", "")
    pdb_id = info.get("_entry.id", "") or (structure.name if fmt == "mmcif" else "")
    if fmt == "pdb" and not pdb_id:
        pdb_id = _pdb_header_id(text)
    predicted = _is_predicted(path, title)
    with_plddt = plddt == "always" or (plddt == "auto" and predicted)
    out = StructureFile(str(where), fmt, pdb_id, title, predicted, repaired=repaired)
    model = structure[0]
    for chain in model:
        if chains is not None and chain.name not in chains:
            continue
        residues = _chain_residues(chain)
        if out.chain(chain.name) is not None or chain.name in out.ambiguous:
            continue  # merge_chain_parts leaves one part per id; never keep half of a reused id
        if chain.name in ambiguous:
            out.ambiguous[chain.name] = ambiguous[chain.name]
        elif residues:
            out.chains.append(_chain_arrays(chain.name, residues, with_plddt))
        elif chain.name not in out.other_chains:
            out.other_chains.append(chain.name)
    protein = {c.chain for c in out.chains} | set(out.ambiguous)
    out.other_chains = [name for name in out.other_chains if name not in protein]
    return out


def _pdb_header_id(text: str) -> str:
    if text.startswith("HEADER") and len(text) >= 66:
        candidate = text[62:66].strip()
        if len(candidate) == 4 and candidate.isalnum():
            return candidate.upper()
    return ""


def _chain_arrays(chain_id: str, residues: list, with_plddt: bool) -> StructureChain:
    length = len(residues)
    flat = [0.0] * (length * 12)
    present = [False] * (length * 4)
    plddt = [0.0] * length if with_plddt else None
    for i, (_, _, _, backbone, _) in enumerate(residues):
        for name, atom in backbone.items():
            j = i * 4 + _ATOM_INDEX[name]
            pos = atom.pos
            flat[3 * j : 3 * j + 3] = (pos.x, pos.y, pos.z)
            present[j] = True
        if plddt is not None:
            plddt[i] = backbone["CA"].b_iso
    coords = np.asarray(flat, dtype=np.float32).reshape(length, len(BACKBONE_ATOMS), 3)
    mask = np.asarray(present, dtype=bool).reshape(length, len(BACKBONE_ATOMS))
    bad = ~np.isfinite(coords).all(axis=-1)
    if bad.any():  # never trust a non-finite coordinate: treat it as a missing atom
        mask &= ~bad
        coords[bad] = 0.0
    kinds = [kind for _, kind, _, _, _ in residues]
    numbers = np.asarray([number for *_, (number, _) in residues], dtype=np.int32)
    return StructureChain(
        chain=chain_id,
        sequence="".join(letter for letter, *_ in residues),
        backbone=Backbone(coords, mask, None if plddt is None else np.asarray(plddt, dtype=np.float32), numbers),
        num_modified=kinds.count("modified"),
        num_unknown=kinds.count("unknown"),
    )
