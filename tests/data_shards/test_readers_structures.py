"""Structure reader (data_shards/readers/structures.py) on real PDB / mmCIF / AlphaFold files."""

import csv
import gzip
from pathlib import Path

import gemmi
import numpy as np
import pytest

from data_shards.readers.structures import (
    StructureError,
    looks_like_structure_file,
    read_structure,
    read_structure_bytes,
)
from data_shards.schema import Backbone, validate_backbone

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
STRUCTURES = SHARED / "structures"
needs_data = pytest.mark.skipif(not STRUCTURES.exists(), reason="shared data not present")


def table_sequences() -> dict[tuple[str, str], str]:
    with open(SHARED / "annotations" / "pdb_chains.tsv") as handle:
        return {
            (Path(row["structure_file"]).name, row["chain"]): row["sequence"]
            for row in csv.DictReader(handle, delimiter="\t")
        }


def atom_lines(path: Path, atom: str = "CA") -> list[str]:
    with gzip.open(path, "rt") as handle:
        return [line for line in handle if line.startswith(("ATOM", "HETATM")) and line[12:16].strip() == atom]


@needs_data
def test_plain_pdb_matches_the_table_and_schema():
    parsed = read_structure(STRUCTURES / "plip" / "1acj.pdb.gz")
    assert parsed.format == "pdb" and parsed.pdb_id == "1ACJ" and not parsed.predicted
    chain = parsed.chain("A")
    assert chain.sequence == table_sequences()[("1acj.pdb.gz", "A")]
    validate_backbone(chain.backbone)
    assert chain.backbone.plddt is None and len(chain.backbone) == len(chain.sequence)
    ca_lines = atom_lines(STRUCTURES / "plip" / "1acj.pdb.gz")
    numbers = [int(line[22:26]) for line in ca_lines if line[21] == "A" and line.startswith("ATOM")]
    assert chain.backbone.residue_number.tolist() == numbers  # author numbering, gaps included
    assert chain.backbone.residue_number.dtype == np.int32 and (np.diff(numbers) > 1).any()
    first_ca = ca_lines[0]
    expected = [float(first_ca[30:38]), float(first_ca[38:46]), float(first_ca[46:54])]
    np.testing.assert_allclose(chain.backbone.coords[0, 1], expected, atol=1e-3)


@needs_data
def test_gzipped_mmcif_with_mse_read_as_met():
    parsed = read_structure(STRUCTURES / "biopython" / "1A8O.cif.gz")
    assert parsed.format == "mmcif" and parsed.pdb_id == "1A8O"
    chain = parsed.chain("A")
    assert chain.num_modified >= 1 and chain.sequence.startswith("MDIRQGPKEPFRDYVDRFYKTLRAEQASQEVKNWMTETLL")
    assert set(chain.sequence) <= set("ACDEFGHIKLMNPQRSTVWYX")


@needs_data
def test_mse_in_pdb_file():
    chain = read_structure(STRUCTURES / "plip" / "1xdn.pdb.gz").chain("A")
    assert chain.num_modified == 3 and "X" not in chain.sequence
    assert chain.sequence == table_sequences()[("1xdn.pdb.gz", "A")]


@needs_data
def test_first_altloc_is_kept():
    path = STRUCTURES / "plip" / "2pvb.pdb.gz"
    chain = read_structure(path).chain("A")
    altloc_a = next(line for line in atom_lines(path) if line[16] == "A" and line[22:26].strip() == "1")
    expected = [float(altloc_a[30:38]), float(altloc_a[38:46]), float(altloc_a[46:54])]
    np.testing.assert_allclose(chain.backbone.coords[0, 1], expected, atol=1e-3)  # A has the lower occupancy
    assert len(chain.sequence) == len(table_sequences()[("2pvb.pdb.gz", "A")])


@needs_data
def test_model_one_of_an_nmr_ensemble():
    path = STRUCTURES / "plip" / "2ndo.pdb.gz"
    chain = read_structure(path).chain("A")
    first_ca = atom_lines(path)[0]  # the first CA line belongs to MODEL 1
    np.testing.assert_allclose(
        chain.backbone.coords[0, 1], [float(first_ca[30:38]), float(first_ca[38:46]), float(first_ca[46:54])], atol=1e-3
    )
    assert len(chain.sequence) == len(table_sequences()[("2ndo.pdb.gz", "A")])


@needs_data
def test_missing_atoms_are_masked():
    chain = read_structure(STRUCTURES / "db5.5" / "1E6J_l_b.pdb.gz").chain("P")
    mask = chain.backbone.atom_mask
    assert mask[:, 1].all()  # observed residues always have CA
    assert not mask.all() and mask[209].tolist() == [True, True, True, False]
    assert (chain.backbone.coords[~mask] == 0).all()


@needs_data
def test_junk_charge_columns_are_repaired_not_dropped():
    path = STRUCTURES / "db5.5" / "1ACB_r_b.pdb.gz"
    with pytest.raises(RuntimeError, match="charge"):
        gemmi.read_structure(str(path))  # what a strict parser does
    parsed = read_structure(path)
    assert parsed.repaired and "charge" in parsed.repaired[0]
    assert parsed.chain("E").sequence == table_sequences()[("1ACB_r_b.pdb.gz", "E")]


@needs_data
def test_foldseek_gz_without_extension(tmp_path):
    path = STRUCTURES / "foldseek" / "d3g46a_.gz"
    assert looks_like_structure_file(path)
    parsed = read_structure(path)
    chain = parsed.chains[0]
    assert chain.sequence == table_sequences()[("d3g46a_.gz", chain.chain)]
    plain = tmp_path / "d3g46a_"  # the same file, not gzipped and without any extension
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    assert read_structure(plain).chains[0].sequence == chain.sequence


@needs_data
def test_alphafold_plddt_from_b_factors():
    path = sorted((SHARED / "alphafold").glob("AF-*.pdb.gz"))[0]
    parsed = read_structure(path)
    assert parsed.predicted and len(parsed.chains) == 1
    backbone = parsed.chains[0].backbone
    expected = np.array([float(line[60:66]) for line in atom_lines(path)], dtype=np.float32)
    np.testing.assert_allclose(backbone.plddt, expected, atol=1e-2)
    assert backbone.plddt.dtype == np.float32 and 0 < backbone.plddt.min() <= backbone.plddt.max() <= 100
    assert read_structure(path, plddt="never").chains[0].backbone.plddt is None


@needs_data
def test_mmcif_written_by_gemmi_from_a_real_pdb(tmp_path):
    source = STRUCTURES / "plip" / "1acj.pdb.gz"
    structure = gemmi.read_structure(str(source))
    structure.setup_entities()
    cif = tmp_path / "1acj.cif"
    structure.make_mmcif_document().write_file(str(cif))
    (tmp_path / "1acj.cif.gz").write_bytes(gzip.compress(cif.read_bytes()))
    pdb_chain = read_structure(source).chain("A")
    for path in (cif, tmp_path / "1acj.cif.gz"):
        cif_chain = read_structure(path).chain("A")
        assert cif_chain.sequence == pdb_chain.sequence
        np.testing.assert_allclose(cif_chain.backbone.coords, pdb_chain.backbone.coords, atol=1e-3)


def test_bad_structure_files_raise_structure_error(tmp_path):
    empty = tmp_path / "empty.pdb"
    empty.write_text("")
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("data_x\nloop_\n_atom_site.id\n'unterminated\n")
    truncated = tmp_path / "cut.pdb.gz"
    truncated.write_bytes(
        gzip.compress(b"ATOM      1  CA  GLY A   1       0.000   0.000   0.000  1.00  0.00           C\n" * 200)[:100]
    )
    for path in (empty, garbage, truncated, tmp_path / "absent.pdb"):
        with pytest.raises(StructureError, match=path.name):
            read_structure(path)


def _backbone_pdb(chains: dict[str, int]) -> str:
    """A PDB text with one straight glycine backbone of the given length per chain."""
    lines = []
    for chain, length in chains.items():
        for i in range(1, length + 1):
            for name, dx in (("N", 0.0), ("CA", 1.46), ("C", 2.0), ("O", 2.6)):
                x = 3.8 * i + dx
                lines.append(
                    f"ATOM  {len(lines) + 1:>5}  {name:<3} GLY {chain}{i:>4}    {x:8.3f}{0.0:8.3f}{0.0:8.3f}"
                    f"  1.00 20.00           {name[0]}"
                )
    return "\n".join(lines) + "\nEND\n"


def test_every_member_of_a_multi_member_gzip_is_read(tmp_path):
    """bgzip, ``pigz -i`` and ``cat a.gz b.gz`` write several gzip members; zcat reads them all, and
    so must we (the first member alone was two and a half chains of four, without an error)."""
    text = _backbone_pdb({"A": 30, "B": 30, "C": 30, "D": 30}).encode()
    cut = len(text) // 2 + 7  # mid-line, mid-chain
    path = tmp_path / "multi.pdb.gz"
    path.write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    assert gzip.decompress(path.read_bytes()) == text
    parsed = read_structure(path)
    assert [(c.chain, len(c.sequence)) for c in parsed.chains] == [("A", 30), ("B", 30), ("C", 30), ("D", 30)]
    path.write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]) + b"\0\0")  # zero padding is fine
    assert len(read_structure(path).chains) == 4
    path.write_bytes(gzip.compress(text) + b"not gzip")
    with pytest.raises(StructureError, match="multi.pdb.gz: trailing garbage"):
        read_structure(path)


def test_unknown_residues_ligands_and_non_protein_chains(tmp_path):
    def atom(serial, record, name, res, seq, x):
        coords = f"{x:8.3f}{0.0:8.3f}{0.0:8.3f}"
        return f"{record:<6}{serial:>5} {name:<4} {res:>3} A{seq:>4}    {coords}  1.00  0.00           C"

    lines = [
        atom(1, "ATOM", " N", "ALA", 1, 0.0),
        atom(2, "ATOM", " CA", "ALA", 1, 1.4),
        atom(3, "ATOM", " C", "ALA", 1, 2.0),
    ]
    lines += [
        atom(4, "HETATM", " N", "ZZZ", 2, 3.3),
        atom(5, "HETATM", " CA", "ZZZ", 2, 3.9),
        atom(6, "HETATM", " C", "ZZZ", 2, 5.4),
    ]
    lines += [
        atom(7, "ATOM", " N", "GLY", 3, 6.6),
        atom(8, "ATOM", " CA", "GLY", 3, 7.9),
        atom(9, "ATOM", " C", "GLY", 3, 9.0),
    ]
    lines += [atom(10, "ATOM", " O", "GLY", 3, 9.5)]
    # a ligand with amino-acid-like atoms after the chain, and a water-only chain B
    lines += [atom(11, "HETATM", " N", "SAH", 9, 20.0), atom(12, "HETATM", " CA", "SAH", 9, 21.0)]
    lines += [
        atom(13, "HETATM", " C", "SAH", 9, 22.0),
        "HETATM   14  O   HOH B   1       9.000   9.000   9.000  1.00  0.00           O",
    ]
    path = tmp_path / "tiny.pdb"
    path.write_text("\n".join(lines) + "\nEND\n")
    parsed = read_structure(path)
    assert [c.chain for c in parsed.chains] == ["A"] and parsed.other_chains == ["B"]
    chain = parsed.chain("A")
    assert chain.sequence == "AXG" and chain.num_unknown == 1
    assert chain.backbone.residue_number.tolist() == [1, 2, 3]
    assert chain.backbone.atom_mask.tolist() == [[True, True, True, False]] * 2 + [[True] * 4]
    assert isinstance(chain.backbone, Backbone)


def test_structure_suffixes():
    assert looks_like_structure_file("x/1abc.pdb.gz") and looks_like_structure_file("d1asha_.gz")
    assert looks_like_structure_file("1ABC.cif") and looks_like_structure_file("2hhb.ent.gz")
    assert not looks_like_structure_file("README.md") and not looks_like_structure_file("table.tsv.gz")
    assert not looks_like_structure_file("LICENSE") and not looks_like_structure_file(".hidden.pdb")


_THREE = {"A": "ALA", "G": "GLY", "K": "LYS", "M": "MET", "V": "VAL", "L": "LEU", "S": "SER"}


def _segments_pdb(*segments: tuple[str, int, str, str], ter: bool = True) -> str:
    """PDB text from (chain id, first residue number, one-letter sequence, record) segments, each
    followed by a TER record when ``record`` is "ATOM" and ``ter`` (HETATM segments are ligands)."""
    lines, serial = [], 1
    for chain, start, sequence, record in segments:
        for i, letter in enumerate(sequence, start):
            for name, dx in (("N", 0.0), ("CA", 1.46), ("C", 2.0), ("O", 2.6)):
                x = 3.8 * i + dx
                lines.append(
                    f"{record:<6}{serial:>5}  {name:<3} {_THREE[letter]} {chain}{i:>4}    {x:8.3f}{0.0:8.3f}{0.0:8.3f}"
                    f"  1.00 20.00           {name[0]}"
                )
                serial += 1
        if record == "ATOM" and ter:
            lines.append(f"TER   {serial:>5}      {_THREE[sequence[-1]]} {chain}{start + len(sequence) - 1:>4}")
            serial += 1
    return "\n".join(lines) + "\nEND\n"


@pytest.mark.parametrize(
    "segments, why",
    [
        # the same id again after another chain, numbering restarting (a second molecule)
        ([("A", 1, "MKVLA", "ATOM"), ("B", 1, "GGSGG", "ATOM"), ("A", 1, "SSSLL", "ATOM")], "used again after chain B"),
        # ... or numbered on (a peptide named like the protein)
        ([("A", 1, "MKVLA", "ATOM"), ("B", 1, "GGSGG", "ATOM"), ("A", 901, "SSSLL", "ATOM")], "used again"),
        # right after its own TER, numbering restarting
        ([("A", 1, "MKVLA", "ATOM"), ("A", 1, "SSSLL", "ATOM")], "starts again after TER"),
    ],
)
def test_a_chain_id_used_for_two_chains_is_never_merged(tmp_path, segments, why):
    """Reading these as one chain A spliced two molecules into one sequence and one backbone."""
    path = tmp_path / "reused.pdb"
    path.write_text(_segments_pdb(*segments))
    parsed = read_structure(path)
    assert parsed.chain("A") is None and why in parsed.ambiguous["A"]
    assert [c.chain for c in parsed.chains] == ["B"] * ("B" in {s[0] for s in segments})
    assert "A" not in parsed.other_chains
    assert read_structure(path, chains={"A"}).ambiguous.keys() == {"A"}


def test_a_residue_number_twice_in_one_chain_is_not_merged(tmp_path):
    """No TER, the numbering starts again: gemmi merges the two residue 4s and dropping alternate
    locations then silently kept the first copy of every repeated number."""
    path = tmp_path / "twice.pdb"
    path.write_text(_segments_pdb(("A", 1, "MKVLA", "ATOM"), ("A", 1, "SSSLL", "ATOM"), ter=False))
    parsed = read_structure(path)
    assert parsed.chain("A") is None and "occurs twice in chain A" in parsed.ambiguous["A"]


def test_one_chain_across_a_ter_and_ligands_after_it_stay_one_chain(tmp_path):
    """Not ambiguous: a TER at a chain break with the numbering going on (some programs write
    that), and free amino acids as HETATM ligands after the chain (as in 6r79)."""
    path = tmp_path / "one.pdb"
    path.write_text(
        _segments_pdb(
            ("A", 1, "MKVLA", "ATOM"), ("A", 10, "SSSLL", "ATOM"), ("A", 1, "G", "HETATM"), ("A", 301, "GG", "HETATM")
        )
    )
    parsed = read_structure(path)
    assert parsed.ambiguous == {}
    chain = parsed.chain("A")
    assert chain.sequence == "MKVLASSSLL" and chain.backbone.residue_number.tolist() == [1, 2, 3, 4, 5] + list(
        range(10, 15)
    )


def test_mmcif_author_chain_over_two_polymer_chains_is_not_merged(tmp_path):
    """mmCIF says it outright: one auth_asym_id, two label_asym_ids (two entities)."""
    header = "data_x\nloop_\n" + "".join(
        f"_atom_site.{name}\n"
        for name in (
            "group_PDB id type_symbol label_atom_id label_alt_id label_comp_id label_asym_id label_entity_id "
            "label_seq_id pdbx_PDB_ins_code Cartn_x Cartn_y Cartn_z occupancy B_iso_or_equiv auth_seq_id "
            "auth_asym_id pdbx_PDB_model_num"
        ).split()
    )
    rows, serial = [], 1
    for label, entity, residues in (("A", 1, ["MET", "LYS", "VAL"]), ("B", 2, ["GLY", "SER", "GLY"])):
        for i, res in enumerate(residues, 1):
            for name, dx in (("N", 0.0), ("CA", 1.46), ("C", 2.0), ("O", 2.6)):
                x = 3.8 * i + dx
                rows.append(f"ATOM {serial} {name[0]} {name} . {res} {label} {entity} {i} ? {x:.3f} 0 0 1 20 {i} A 1\n")
                serial += 1
    path = tmp_path / "two.cif"
    path.write_text(header + "".join(rows))
    parsed = read_structure(path)
    assert parsed.format == "mmcif" and parsed.chains == []
    assert parsed.ambiguous == {"A": "chain A holds two polymer chains (label_asym_id A and B)"}


@needs_data
def test_real_6r79_free_glycines_after_ter_are_ligands_not_a_second_chain():
    """6r79 lists free glycines (HETATM GLY A 304...) after the TER of chain D, under chain ids A-D:
    each chain id holds one beta-lactamase chain and its ligands, read exactly as in the table."""
    path = STRUCTURES / "plip" / "6r79.pdb.gz"
    glycines = [line for line in atom_lines(path) if line.startswith("HETATM") and line[17:20] == "GLY"]
    assert glycines  # the real file does carry them
    parsed = read_structure(path)
    assert parsed.ambiguous == {} and [c.chain for c in parsed.chains] == ["A", "B", "C", "D"]
    table = table_sequences()
    for chain in parsed.chains:
        assert chain.sequence == table[("6r79.pdb.gz", chain.chain)]
        assert chain.backbone.residue_number.max() < 300  # no ligand residue in the chain


@needs_data
def test_no_real_structure_file_is_taken_for_reused_chain_ids():
    """Over every file of the shared set (1,487 PDB/mmCIF files): none holds a reused chain id, so
    the check costs no real chain (calibration against false positives)."""
    files = sorted(p for p in STRUCTURES.rglob("*") if p.is_file() and looks_like_structure_file(p))
    flagged = {}
    for path in files:
        try:
            parsed = read_structure(path)
        except StructureError:
            continue
        if parsed.ambiguous:
            flagged[path.name] = parsed.ambiguous
    assert len(files) > 1400 and flagged == {}


# ----------------------------------------------------------------------------- bytes in memory


def _plain(value):
    """A structure file (dataclasses, lists, dicts, arrays) as comparable plain values; arrays by
    dtype, shape and bytes, so equal means bit-identical."""
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if hasattr(value, "__dataclass_fields__"):
        return (type(value).__name__, {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__})
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _same_as_the_file(path: Path, **options) -> None:
    from_file = read_structure(path, **options)
    from_bytes = read_structure_bytes(path.read_bytes(), path.name, where=str(path), **options)
    assert _plain(from_bytes) == _plain(from_file) and from_file.chains


@needs_data
@pytest.mark.parametrize(
    "path",
    [
        STRUCTURES / "db5.5" / "1ACB_r_b.pdb.gz",  # .pdb.gz with junk charge columns (repaired)
        STRUCTURES / "biopython" / "1A8O.cif.gz",  # .cif.gz with MSE
        STRUCTURES / "foldseek" / "d3g46a_.gz",  # gzipped PDB without an extension
        sorted((SHARED / "alphafold").glob("AF-*.pdb.gz"))[0] if (SHARED / "alphafold").is_dir() else None,
    ],
    ids=["pdb.gz", "cif.gz", "no-extension", "alphafold"],
)
def test_bytes_read_exactly_as_the_file(path, tmp_path):
    if path is None:
        pytest.skip("no AlphaFold models in the shared data")
    _same_as_the_file(path)
    _same_as_the_file(path, plddt="always")
    plain = tmp_path / path.name.removesuffix(".gz")  # the same file unzipped: .pdb, .cif
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    _same_as_the_file(plain)
    chain = read_structure(path).chains[0].chain
    _same_as_the_file(plain, chains={chain}, plddt="never")
    if path.name.startswith("AF-"):
        parsed = read_structure_bytes(path.read_bytes(), path.name, where="proteome.tar:" + path.name)
        assert parsed.predicted and parsed.chains[0].backbone.plddt is not None
        assert parsed.path == "proteome.tar:" + path.name


def test_bytes_of_a_small_generated_pdb(tmp_path):
    text = _backbone_pdb({"A": 12, "B": 7}).encode()
    for name, data in (("gen.pdb", text), ("gen.pdb.gz", gzip.compress(text)), ("AF-Q1-F1-model_v4.pdb", text)):
        path = tmp_path / name
        path.write_bytes(data)
        _same_as_the_file(path)
        _same_as_the_file(path, chains={"B"})
    # the name, not the folder, tells an AlphaFold model (this text has no ALPHAFOLD title)
    assert read_structure_bytes(text, "models/AF-Q1-F1-model_v4.pdb").predicted
    parsed = read_structure_bytes(text, "gen.pdb")
    assert not parsed.predicted and parsed.path == "gen.pdb" and parsed.chains[0].backbone.plddt is None
    assert [(c.chain, len(c.sequence)) for c in parsed.chains] == [("A", 12), ("B", 7)]


def test_bad_bytes_raise_the_same_error_naming_where(tmp_path):
    truncated = gzip.compress(_backbone_pdb({"A": 40}).encode())[:120]
    cases = {
        "empty.pdb": b"",
        "garbage.cif": b"data_x\nloop_\n_atom_site.id\n'unterminated\n",
        "cut.pdb.gz": truncated,
        "junk.pdb.gz": gzip.compress(b"ATOM") + b"junk",
        "page.pdb": b"<html>not found</html>\n",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(StructureError) as from_file:
            read_structure(path)
        with pytest.raises(StructureError) as from_bytes:
            read_structure_bytes(data, name, where=f"a.tar:{name}")
        assert str(from_bytes.value) == str(from_file.value).replace(str(path), f"a.tar:{name}")
        assert str(from_bytes.value).startswith(f"a.tar:{name}: ")
