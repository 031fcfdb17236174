"""``python -m data_shards build`` (data_shards/build.py): real data end to end, bad input, determinism."""

import csv
import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from data_shards import parallel_parse
from data_shards.__main__ import main
from data_shards.build import BuildConfig, BuildInputError, build_shards
from data_shards.manifest import load_manifest
from data_shards.parallel_parse import WORKER_DIED
from data_shards.reader import iter_records
from data_shards.readers.obo import load_obo
from data_shards.validate import inspect_dir, validate_dir
from data_shards.writer import ShardWriter
from tests.data_shards import crash_parser

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
ANN = SHARED / "annotations"
OBO = ANN / "go-basic_2021-12-15.obo.gz"
needs_data = pytest.mark.skipif(not (ANN / "pdb_chains.tsv").exists(), reason="shared data not present")

TINY_OBO = """format-version: 1.2

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function
def: "A molecular process." [GOC:x]

[Term]
id: GO:0004672
name: protein kinase activity
namespace: molecular_function
alt_id: GO:0004673
def: "Catalysis of the phosphorylation of an amino acid residue in a protein." [GOC:x]
is_a: GO:0003674

[Term]
id: GO:0005575
name: cellular_component
namespace: cellular_component

[Term]
id: GO:0005737
name: cytoplasm
namespace: cellular_component
is_a: GO:0005575
"""


def pdb_text(chains: dict[str, str], water_chain: str | None = None) -> str:
    """A small PDB file: one straight backbone per chain with the given one-letter sequence."""
    three = {"A": "ALA", "G": "GLY", "K": "LYS", "M": "MET", "V": "VAL", "L": "LEU", "S": "SER"}
    lines, serial = [], 1
    for chain, sequence in chains.items():
        for i, letter in enumerate(sequence, 1):
            for name, dx in (("N", 0.0), ("CA", 1.46), ("C", 2.0), ("O", 2.6)):
                x = 3.8 * i + dx
                lines.append(
                    f"ATOM  {serial:>5}  {name:<3} {three[letter]} {chain}{i:>4}    {x:8.3f}{0.0:8.3f}{0.0:8.3f}"
                    f"  1.00 20.00           {name[0]}"
                )
                serial += 1
    if water_chain:
        lines.append(
            f"HETATM{serial:>5}  O   HOH {water_chain}   1       0.000   9.000   0.000  1.00 20.00           O"
        )
    return "\n".join(lines) + "\nEND\n"


def shard_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.suffix == ".tar" or p.name == "manifest.json")
    }


def all_records(root: Path):
    manifest = load_manifest(root)
    return [r for shard in manifest.shards for r in iter_records(shard.path)]


# ----------------------------------------------------------------------------- crafted inputs


@pytest.fixture
def crafted(tmp_path) -> dict:
    data = tmp_path / "data"
    (data / "structures").mkdir(parents=True)
    (data / "structures" / "good.pdb").write_text(pdb_text({"A": "MKVLA", "B": "GGSGG"}, water_chain="W"))
    (data / "structures" / "good2.pdb.gz").write_bytes(gzip.compress(pdb_text({"A": "MKVLA"}).encode()))
    full = gzip.compress(pdb_text({"A": "MKVLAGGSKL" * 20}).encode())
    (data / "structures" / "truncated.pdb.gz").write_bytes(full[: len(full) // 2])
    (data / "structures" / "garbage.cif").write_text("data_x\nloop_\n_atom_site.id\n'oops\n")
    (tmp_path / "outside.pdb").write_text(pdb_text({"A": "MKV"}))
    table = data / "chains.tsv"
    rows = [
        ("structures/good.pdb", "A", "1ABC", "P12345", "GO:0004673;GO:9999999", "GO:0005737", "2.7.11.1", "MKVLA"),
        ("structures/good.pdb", "B", "1ABC", "", "", "", "", "GGSGG"),
        ("structures/good.pdb", "W", "1ABC", "", "", "", "", ""),  # water only
        ("structures/good.pdb", "Z", "1ABC", "", "", "", "", ""),  # not in the file
        ("structures/good.pdb", "A", "1ABC", "P12345", "", "", "", ""),  # duplicate row
        ("structures/good2.pdb.gz", "A", "2XYZ", "P12345", "", "", "", "MKVLA"),
        ("structures/truncated.pdb.gz", "A", "3TRN", "", "", "", "", ""),
        ("structures/garbage.cif", "A", "4GRB", "", "", "", "", ""),
        ("structures/absent.pdb", "A", "5ABS", "", "", "", "", ""),
        ("../outside.pdb", "A", "6OUT", "", "", "", "", ""),
    ]
    header = ["structure_file", "chain", "pdb_id", "uniprot", "go_mf", "go_cc", "ec", "sequence"]
    table.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    fasta = data / "extra.fasta"
    fasta.write_text(
        ">sp|Q99999|TEST_HUMAN Test protein OS=Homo sapiens OX=9606 PE=2 SV=1\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n"
        ">empty_one\n\n>dna_one\nACGTACGTACGTACGTACGT\n>weird_one\nMKV1LA\n"
    )
    obo = data / "tiny.obo"
    obo.write_text(TINY_OBO)
    return {"root": tmp_path, "table": table, "fasta": fasta, "obo": obo}


def test_bad_input_is_skipped_with_reasons(crafted):
    out = crafted["root"] / "out"
    summary = build_shards(
        BuildConfig(
            out=out, annotations=[str(crafted["table"])], fasta=[str(crafted["fasta"])], go_obo=str(crafted["obo"])
        )
    )
    assert summary["ok"] and summary["num_samples"] == 4  # good A, good B, good2 A, Q99999
    skipped = {reason: entry["count"] for reason, entry in summary["skipped"].items()}
    assert skipped == {
        "chain has no amino-acid residues": 1,
        "chain missing from structure file": 1,
        "duplicate table row": 1,
        "unreadable structure file": 2,
        "structure file missing": 1,
        "structure path escapes the allowed folders": 1,
        "empty sequence": 1,
        "non-amino-acid sequence (nucleotides)": 1,
        "non-amino-acid sequence (characters outside A-Z)": 1,
    }
    assert summary["skipped_terms"] == {"unknown GO id": {"count": 1, "examples": ["good_A:GO:9999999"]}}
    manifest = load_manifest(out)
    assert manifest.extra["skipped"] == summary["skipped"] and manifest.extra["coverage"]["samples"] == 4
    assert validate_dir(out)["ok"]
    assert inspect_dir(out)["texts_with_go_definitions"] == 1  # good_A's kinase term
    records = {r.id: r for r in all_records(out)}
    assert set(records) == {"good_A", "good_B", "good2_A", "Q99999"}
    good = records["good_A"]
    assert good.sequence == "MKVLA" and good.meta["accession"] == "P12345" and good.meta["pdb_id"] == "1ABC"
    assert [(t["id"], t["aspect"], t["name"]) for t in good.text["go"]] == [
        ("GO:0004672", "F", "protein kinase activity"),  # alt id canonicalised
        ("GO:0005737", "C", "cytoplasm"),
    ]
    assert good.text["function"].startswith("Catalysis of the phosphorylation")  # from the GO definition
    # the OBO definition travels with the term (for definition paraphrases); cytoplasm has none
    assert good.text["go"][0]["definition"].startswith("Catalysis of the phosphorylation")
    assert "definition" not in good.text["go"][1]
    assert good.text["location"] == "Located in cytoplasm." and good.meta["text_derived"] == ["function", "location"]
    assert good.text["ec"] == ["2.7.11.1"] and good.meta["property_coverage"] == 0
    assert records["good_B"].text is None and records["good_B"].backbone is not None
    fasta = records["Q99999"]
    assert fasta.backbone is None and fasta.meta["evidence"] == 2 and fasta.meta["source"] == "fasta"
    assert fasta.text["name"] == "Test protein" and fasta.meta["property_coverage"] == 1
    props = manifest.shards[0].sample_props
    assert props["existence"] == [None, None, None, 2] and props["coverage"] == [0, 0, 0, 1]


def test_truncated_sequence_files_are_skipped_and_counted(crafted):
    """A gzip cut short mid-file: the records read before the cut are kept, the rest is one counted skip."""
    data = crafted["root"] / "data"
    good = ">sp|Q99999|TEST_HUMAN Test protein OS=Homo sapiens OX=9606 PE=2 SV=1\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n"
    whole = gzip.compress((good + "".join(f">x{i}\n{'MKVLA' * 40}\n" for i in range(200))).encode())
    (data / "cut.fasta.gz").write_bytes(whole[: len(whole) // 2])
    entry = "ID   E{0}_HUMAN  Reviewed;  10 AA.\nAC   Q8{0:04d};\nOS   Homo sapiens.\nSQ   SEQUENCE\n     {1}\n//\n"
    whole = gzip.compress("".join(entry.format(i, "MKVLAGGSKL" * (1 + i % 7)) for i in range(400)).encode())
    (data / "cut.dat.gz").write_bytes(whole[: len(whole) // 2])
    config = BuildConfig(
        out=crafted["root"] / "cut", fasta=[str(data / "cut.fasta.gz")], uniprot=[str(data / "cut.dat.gz")]
    )
    summary = build_shards(config)
    skipped = {reason: entry["count"] for reason, entry in summary["skipped"].items()}
    assert skipped["unreadable FASTA file (rest of file ignored)"] == 1
    assert skipped["unreadable UniProt file (rest of file ignored)"] == 1
    assert "cut.fasta.gz" in summary["skipped"]["unreadable FASTA file (rest of file ignored)"]["examples"][0]
    assert summary["num_samples"] >= 2 and {"Q99999", "Q80000"} <= {r.id for r in all_records(crafted["root"] / "cut")}


def _sides(out) -> dict[str, str]:
    return {r.id: split for split in ("train", "heldout") for r in all_records(out / split)}


def test_sequence_clusters_keep_homologues_on_one_side(crafted, capsys):
    """fasta -> (an external clustering tool) -> build --split-clusters: a cluster never straddles the split."""
    root, data = crafted["root"], crafted["root"] / "data"
    inputs = ["--annotations", str(crafted["table"]), "--fasta", str(crafted["fasta"])]
    assert main(["build", "--out", str(root / "all"), *inputs]) == 0
    capsys.readouterr()
    assert main(["fasta", str(root / "all"), "--out", str(root / "all.fasta")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sequences"] == 4 and report["bad_samples"] == 0
    fasta = (root / "all.fasta").read_text()
    assert ">Q99999\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n" in fasta and fasta.count(">") == 4
    # what `mmseqs easy-cluster` would write if good_B (GGSGG) and Q99999 were homologues
    table = data / "clu_cluster.tsv"
    table.write_text("good_B\tgood_B\ngood_B\tQ99999\ngood_A\tgood_A\nnot_built\tnot_built\n")
    split_seeds, apart = range(12), 0
    for seed in split_seeds:
        args = ["build", *inputs, "--split-heldout", "0.5", "--split-seed", str(seed), "--overwrite"]
        assert main([*args, "--out", str(root / "plain")]) == 0
        capsys.readouterr()
        plain = _sides(root / "plain")
        apart += plain["good_B"] != plain["Q99999"]
        assert main([*args, "--out", str(root / "clustered"), "--split-clusters", str(table)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["split_clusters"] == {"records_listed": 3, "records_unlisted": 1}
        sides = _sides(root / "clustered")
        assert sides["good_B"] == sides["Q99999"], seed
        assert sides["good_A"] == sides["good2_A"]  # the accession link still holds
    assert apart > 0  # without the table the two do get separated (the test can fail)
    manifest = load_manifest(root / "clustered" / "train")
    assert "clu_cluster.tsv" in manifest.extra["split_key"]
    assert manifest.extra["split_clusters"]["records_listed"] == 3
    bad = data / "bad.tsv"
    bad.write_text("a\tb\nonly_one_field\n")
    assert (
        main(["build", "--out", str(root / "x"), *inputs, "--split-heldout", "0.5", "--split-clusters", str(bad)]) == 2
    )
    assert "bad.tsv:2" in json.loads(capsys.readouterr().out)["error"]
    assert main(["build", "--out", str(root / "y"), *inputs, "--split-clusters", str(table)]) == 2
    assert "needs split_heldout" in json.loads(capsys.readouterr().out)["error"]


def test_cli_exit_codes(crafted, capsys):
    root = crafted["root"]
    bad_table = root / "data" / "bad.tsv"
    bad_table.write_text("structure_file\tchain\nstructures/absent.pdb\tA\nstructures/truncated.pdb.gz\tA\n")
    assert main(["build", "--out", str(root / "none"), "--annotations", str(bad_table)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["num_samples"] == 0 and report["stats"]["skipped_samples"] == 2
    assert main(["build", "--out", str(root / "x"), "--uniprot", str(root / "nope.dat")]) == 2
    assert "nope.dat" in json.loads(capsys.readouterr().out)["error"]
    args = ["build", "--out", str(root / "ok"), "--annotations", str(crafted["table"]), "--samples-per-shard", "2"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["all"]["num_shards"] == 2
    assert main(args) == 2  # shards exist: refuse without --overwrite
    capsys.readouterr()
    assert main(args + ["--overwrite"]) == 0
    with pytest.raises(BuildInputError):
        build_shards(BuildConfig(out=root / "y", structures=[str(root / "no" / "*.pdb")]))


def test_structures_without_table_and_split(crafted):
    root = crafted["root"]
    structures = root / "data" / "structures"
    summary = build_shards(
        BuildConfig(out=root / "split", structures=[str(structures)], split_heldout=0.5, split_seed=3)
    )
    assert summary["skipped"]["unreadable structure file"]["count"] == 2
    ids = {split: {r.id for r in all_records(root / "split" / split)} for split in ("train", "heldout")}
    assert ids["train"] | ids["heldout"] == {"good_A", "good_B", "good2_A"}
    # good_A and good2_A share a sequence: one cluster, one side
    assert ({"good_A", "good2_A"} <= ids["train"]) or ({"good_A", "good2_A"} <= ids["heldout"])
    for split in ("train", "heldout"):
        assert load_manifest(root / "split" / split).extra["split"] == split


def test_files_without_protein_coordinates_are_counted_not_lost(tmp_path):
    """gemmi reads any text as one empty model: an HTML error page saved as .pdb, a header-only file
    or a ligand-only file must show up among the skipped inputs, not vanish."""
    structures = tmp_path / "structures"
    structures.mkdir()
    (structures / "good.pdb").write_text(pdb_text({"A": "MKVLA"}))
    (structures / "404.pdb").write_text("<html><body><h1>404 Not Found</h1></body></html>\n")
    (structures / "header_only.pdb").write_text(
        "HEADER    HYDROLASE                               01-JAN-00   9ZZZ\nEND\n"
    )
    (structures / "water.pdb").write_text(pdb_text({}, water_chain="W"))
    summary = build_shards(BuildConfig(out=tmp_path / "out", structures=[str(structures)]))
    assert [r.id for r in all_records(tmp_path / "out")] == ["good_A"]
    skipped = summary["skipped"]
    assert skipped["unreadable structure file"]["count"] == 2
    assert any("404.pdb" in e and "no model with atoms" in e for e in skipped["unreadable structure file"]["examples"])
    assert skipped["no protein chain in structure file"]["count"] == 1
    assert "water.pdb (only non-protein chains W)" in skipped["no protein chain in structure file"]["examples"]


SIFTS_HEADER = "# SIFTS excerpt\nPDB\tCHAIN\tSP_PRIMARY\tRES_BEG\tRES_END\tPDB_BEG\tPDB_END\tSP_BEG\tSP_END\n"


def test_pdb_ids_are_not_guessed_where_the_name_misleads(tmp_path):
    """Docking Benchmark unbound partners (1EZU_r_u) are another entry than 1EZU, with other chain
    letters; a table row with no pdb_id means "unknown". Joining SIFTS on a guessed id would attach
    another protein's accession (and its GO / EC) to the chain."""
    structures = tmp_path / "structures"
    structures.mkdir()
    for name in ("1EZU_r_u.pdb", "2ABC_model.pdb", "3DEF.pdb"):
        (structures / name).write_text(pdb_text({"A": "MKVLA"}))
    sifts = tmp_path / "sifts.tsv"
    sifts.write_text(
        SIFTS_HEADER
        + "".join(
            f"{pdb}\tA\t{acc}\t1\t5\t1\t5\t1\t5\n"
            for pdb, acc in (("1ezu", "P23827"), ("2abc", "Q11111"), ("3def", "Q22222"))
        )
    )
    table = tmp_path / "chains.tsv"
    table.write_text("structure_file\tchain\tpdb_id\tuniprot\nstructures/2ABC_model.pdb\tA\t\t\n")

    def accessions(out, **inputs):
        build_shards(BuildConfig(out=out, sifts=[str(sifts)], **inputs))
        return {r.id: (r.meta.get("pdb_id", ""), r.meta.get("accession", "")) for r in all_records(out)}

    no_table = accessions(tmp_path / "a", structures=[str(structures)])
    assert no_table["1EZU_r_u_A"] == ("", "")  # never the complex's chain A
    assert no_table["3DEF_A"] == ("3DEF", "Q22222")  # a plain id-named file still joins
    with_table = accessions(tmp_path / "b", annotations=[str(table)])
    assert with_table == {"2ABC_model_A": ("", "")}  # the row says: id unknown


# ----------------------------------------------------------------------------- failures mid-build


@pytest.mark.timeout(180)
def test_a_worker_killed_mid_build_costs_its_file_not_the_build(tmp_path, monkeypatch):
    """The OOM killer SIGKILLs a parsing process: ``multiprocessing.Pool`` never returned that job
    and the build hung forever. Now the file is skipped with the reason, every other file is
    built, and the shards are the bytes a build without that file writes."""
    structures = tmp_path / "structures"
    structures.mkdir()
    names = [f"m{i:02d}.pdb" for i in range(6)] + [crash_parser.KILLED_NAME] + [f"p{i:02d}.pdb" for i in range(6)]
    for i, name in enumerate(names):
        (structures / name).write_text(pdb_text({"A": "MKVLAGS"[: 3 + i % 5], "B": "GGSGG"}))
    others = [str(structures / n) for n in names if n != crash_parser.KILLED_NAME]
    reference = tmp_path / "reference"
    build_shards(BuildConfig(out=reference, structures=others, samples_per_shard=4, workers=1))
    monkeypatch.setattr(parallel_parse, "parse_unit", crash_parser.parse_or_die)
    out = tmp_path / "out"
    summary = build_shards(BuildConfig(out=out, structures=[str(structures)], samples_per_shard=4, workers=2))
    assert list(summary["skipped"]) == [WORKER_DIED] and summary["skipped"][WORKER_DIED]["count"] == 1
    (example,) = summary["skipped"][WORKER_DIED]["examples"]
    assert example.startswith(f"{crash_parser.KILLED_NAME}: worker died (signal 9) while reading ")
    assert load_manifest(out).extra["skipped"] == summary["skipped"]
    assert summary["num_samples"] == 2 * len(others) and validate_dir(out)["ok"]
    tars = {name: digest for name, digest in shard_hashes(out).items() if name.endswith(".tar")}
    assert tars == {name: digest for name, digest in shard_hashes(reference).items() if name.endswith(".tar")}


def test_a_failed_overwrite_rebuild_keeps_the_previous_shard_set(crafted, monkeypatch, capsys):
    """``--overwrite`` replaced shard 0 as soon as the new shard 0 was done and the failure then
    deleted it (and a rebuild that found nothing wrote an empty manifest over the old set): the
    previous output was gone. Now the old set is replaced only by a complete new one."""
    root, out = crafted["root"], crafted["root"] / "out"
    inputs = ["--annotations", str(crafted["table"]), "--fasta", str(crafted["fasta"])]
    assert main(["build", "--out", str(out), *inputs, "--samples-per-shard", "1"]) == 0
    before, files = shard_hashes(out), sorted(os.listdir(out))
    assert len(before) == 5  # 4 shards and the manifest

    real_write = ShardWriter.write

    def fail_on_the_third(self, record, props=None):
        if self.num_samples == 2:  # two new shards are complete by now
            raise OSError(28, "No space left on device")
        return real_write(self, record, props)

    monkeypatch.setattr(ShardWriter, "write", fail_on_the_third)
    with pytest.raises(OSError, match="No space left"):
        main(["build", "--out", str(out), *inputs, "--samples-per-shard", "1", "--overwrite"])
    monkeypatch.undo()
    assert shard_hashes(out) == before and sorted(os.listdir(out)) == files  # no leftovers either
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    # a rebuild that finds nothing usable (exit 1) publishes nothing either
    nothing = root / "data" / "nothing.tsv"
    nothing.write_text("structure_file\tchain\nstructures/absent.pdb\tA\n")
    assert main(["build", "--out", str(out), "--annotations", str(nothing), "--overwrite"]) == 1
    assert shard_hashes(out) == before and sorted(os.listdir(out)) == files
    # a complete rebuild replaces the set; the old shards it does not reuse go
    assert main(["build", "--out", str(out), *inputs, "--samples-per-shard", "3", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert load_manifest(out).num_samples == 4


def test_internal_stops_in_fasta_are_skipped_not_spliced(tmp_path):
    fasta = tmp_path / "stops.fasta"
    fasta.write_text(">frag\nMKVLAG*SKLMK\n>whole\nMKVLAGGSKL*\n")
    summary = build_shards(BuildConfig(out=tmp_path / "out", fasta=[str(fasta)]))
    assert summary["skipped"] == {"internal stop '*' in sequence": {"count": 1, "examples": ["frag"]}}
    assert [(r.id, r.sequence) for r in all_records(tmp_path / "out")] == [("whole", "MKVLAGGSKL")]


def test_a_chain_id_used_for_two_chains_is_skipped_and_counted(tmp_path):
    """A second chain A after chain B (a different molecule under the same id) used to be read
    as one chain A: one record with two molecules' sequence and backbone, nothing in ``skipped``."""
    structures = tmp_path / "structures"
    structures.mkdir()
    text = pdb_text({"A": "MKVLA"}).replace("END\n", "TER\n") + pdb_text({"B": "GGSGG"}).replace("END\n", "TER\n")
    (structures / "reused.pdb").write_text(text + pdb_text({"A": "SSSLLKK"}))
    table = tmp_path / "chains.tsv"
    table.write_text("structure_file\tchain\tpdb_id\nstructures/reused.pdb\tA\t9ZZZ\nstructures/reused.pdb\tB\t9ZZZ\n")
    reason = "chain id used by two different chains"
    for name, inputs in (("scan", {"structures": [str(structures)]}), ("table", {"annotations": [str(table)]})):
        summary = build_shards(BuildConfig(out=tmp_path / name, **inputs))
        assert list(summary["skipped"]) == [reason] and summary["skipped"][reason]["count"] == 1
        assert "reused.pdb chain A: chain id A used again after chain B" in summary["skipped"][reason]["examples"][0]
        assert [(r.id, r.sequence) for r in all_records(tmp_path / name)] == [("reused_B", "GGSGG")]


def test_table_rows_without_a_structure_file_give_sequence_and_text_records(crafted):
    """An empty ``structure_file`` was refused as a path escaping the allowed folders, and the
    row's sequence and text were dropped; records with only some modalities are supported."""
    data = crafted["root"] / "data"
    table = data / "mixed.tsv"
    header = ["structure_file", "chain", "pdb_id", "uniprot", "go_mf", "go_cc", "ec", "sequence"]
    rows = [
        ("structures/good.pdb", "A", "1ABC", "P12345", "", "", "", "MKVLA"),
        ("", "B", "7XYZ", "Q77777", "GO:0004673", "GO:0005737", "2.7.11.1", "MSTNPKPQRK"),
        ("", "C", "7XYZ", "", "", "", "", ""),  # nothing to build from
        ("", "B", "7XYZ", "Q77777", "GO:0004673", "GO:0005737", "2.7.11.1", "MSTNPKPQRK"),  # the same row again
    ]
    table.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    out = crafted["root"] / "mixed"
    summary = build_shards(BuildConfig(out=out, annotations=[str(table)], go_obo=str(crafted["obo"])))
    assert summary["skipped"] == {
        "duplicate table row": {"count": 1, "examples": ["mixed.tsv:5  B"]},
        "no structure file and no sequence": {"count": 1, "examples": ["mixed.tsv:4 7XYZ C"]},
    }
    records = {r.id: r for r in all_records(out)}
    assert set(records) == {"good_A", "7XYZ_B"}
    record = records["7XYZ_B"]
    assert record.sequence == "MSTNPKPQRK" and record.backbone is None
    assert [t["id"] for t in record.text["go"]] == ["GO:0004672", "GO:0005737"] and record.text["ec"] == ["2.7.11.1"]
    assert record.meta["accession"] == "Q77777" and (record.meta["pdb_id"], record.meta["chain"]) == ("7XYZ", "B")
    assert "structure_file" not in record.meta and validate_dir(out)["ok"]


def _cli_cases(root: Path) -> list[tuple[list[str], str]]:
    """(arguments, the file the one-line error must name) for missing and malformed inputs."""
    data = root / "data"
    (data / "garbage.bin").write_bytes(b"\x00\xffgarbage\n")
    (data / "empty.txt").write_text("")
    (data / "not_gzip.tsv.gz").write_text("structure_file\tchain\n")
    (data / "no_columns.tsv").write_text("a\tb\n1\t2\n")
    (data / "empty_dir").mkdir()
    (data / "ok.fasta").write_text(">a\nMKVLA\n")
    (root / "broken_shards").mkdir()
    (root / "broken_shards" / "manifest.json").write_text('{"shards": [')
    missing, garbage, empty = str(data / "missing.tsv"), str(data / "garbage.bin"), str(data / "empty.txt")
    out = ["--out", str(root / "cli_out")]
    endpoint = ["--endpoint", "http://127.0.0.1:9", "--retries", "0"]  # never reached: the shards fail first
    cases = []
    for bad in (missing, garbage, empty):
        cases += [
            (["build", *out, "--annotations", bad], bad),
            (["build", *out, "--annotations", bad, "--annotations-format", "chains"], bad),
            (["build", *out, "--annotations", bad, "--annotations-format", "gaf"], bad),
            (["build", *out, "--annotations", bad, "--annotations-format", "sifts_uniprot"], bad),
            (["build", *out, "--annotations", bad, "--annotations-format", "deepfri"], bad),
            (["build", *out, "--annotations", bad, "--annotations-format", "uniprot_tsv"], bad),
            (["build", *out, "--uniprot", bad], bad),
            (["build", *out, "--fasta", bad], bad),
            (["build", *out, "--sifts", bad], bad),
            (["build", *out, "--fasta", str(data / "ok.fasta"), "--go-obo", bad], bad),
            (
                ["build", *out, "--fasta", str(data / "ok.fasta"), "--split-heldout", "0.5", "--split-clusters", bad],
                bad,
            ),
            (["inspect", bad], bad),
            (["validate", bad], bad),
            (["fasta", bad, "--out", str(root / "x.fasta")], bad),
            (
                [
                    "rewrite",
                    "--shards",
                    bad,
                    "--out",
                    str(root / "rw"),
                    "--backend",
                    "openai",
                    "--model",
                    "m",
                    *endpoint,
                ],
                bad,
            ),
        ]
    cases += [
        (["build", *out, "--annotations", str(data / "not_gzip.tsv.gz")], "not_gzip.tsv.gz"),
        (
            ["build", *out, "--annotations", str(data / "no_columns.tsv"), "--annotations-format", "chains"],
            "no_columns",
        ),
        (["build", *out, "--structures", str(data / "empty_dir")], "empty_dir"),
        (["build", "--out", garbage, "--fasta", str(data / "ok.fasta")], garbage),
        (["build", "--out", f"{garbage}/sub", "--fasta", str(data / "ok.fasta")], garbage),
        (["demo", "--out", garbage, "--num-train", "4", "--num-heldout", "2"], garbage),
        (["inspect", str(root / "broken_shards")], "broken_shards"),
        (["validate", str(root / "broken_shards")], "broken_shards"),
        (["fasta", str(root / "broken_shards"), "--out", str(root / "x.fasta")], "broken_shards"),
        (
            ["rewrite", "--shards", str(root / "broken_shards"), "--out", str(root / "rw"), "--backend", "openai"]
            + ["--model", "m", *endpoint],
            "broken_shards",
        ),
    ]
    return cases


def test_cli_missing_or_malformed_inputs_print_one_line_and_exit_2(crafted, capsys):
    """Every subcommand: a missing or malformed input file gives exit 2 and one line naming the
    file (no traceback, no silently empty build)."""
    failures = []
    for args, named in _cli_cases(crafted["root"]):
        try:
            code = main(args)
        except BaseException as exc:  # noqa: BLE001 - a traceback is the failure being tested
            failures.append(f"{' '.join(args)}: raised {type(exc).__name__}: {exc}")
            continue
        printed = capsys.readouterr().out
        lines = printed.strip().splitlines()
        if code != 2 or len(lines) != 1 or named not in json.loads(lines[0]).get("error", ""):
            failures.append(f"{' '.join(args)}: exit {code}, {len(lines)} lines: {printed[:200]}")
    assert failures == []


# ----------------------------------------------------------------------------- real data


def subset_rows() -> list[dict]:
    with open(ANN / "pdb_chains.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    picked = rows[::50]  # 37 rows across every source
    for wanted in ("foldseek/d3g46a_.gz", "biopython/1A8O.cif.gz", "emboss/2hhb.ent.gz"):
        picked.append(next(r for r in rows if r["structure_file"].endswith(wanted)))
    return picked


@pytest.fixture(scope="module")
def real_build(tmp_path_factory):
    if not (ANN / "pdb_chains.tsv").exists() or not OBO.exists():
        pytest.skip("shared data not present")
    tmp = tmp_path_factory.mktemp("real")
    rows = subset_rows()
    table = tmp / "subset.tsv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            target = (ANN / row["structure_file"]).resolve()
            writer.writerow({**row, "structure_file": os.path.relpath(target, tmp)})
    config = dict(
        annotations=[str(table)],
        go_obo=str(OBO),
        data_roots=[str(SHARED / "structures")],
        samples_per_shard=16,
        split_heldout=0.25,
        split_seed=7,
    )
    summary = build_shards(BuildConfig(out=tmp / "a", workers=2, **config))
    again = build_shards(BuildConfig(out=tmp / "b", workers=1, **config))
    return {"rows": rows, "out": tmp / "a", "again": tmp / "b", "summary": summary, "summary_again": again}


@needs_data
def test_real_subset_matches_the_table(real_build):
    rows, out, summary = real_build["rows"], real_build["out"], real_build["summary"]
    assert summary["ok"] and summary["skipped"] == {}  # every chain of the subset is readable
    records = all_records(out / "train") + all_records(out / "heldout")
    assert len(records) == len(rows) == summary["num_samples"]
    by_file = {(Path(r["structure_file"]).name, r["chain"]): r for r in rows}
    matched = 0
    onto = load_obo(OBO)
    for record in records:
        row = by_file[(Path(record.meta["structure_file"]).name, record.meta["chain"])]
        matched += record.sequence == row["sequence"]
        assert record.backbone is not None and len(record.backbone) == len(record.sequence)
        assert record.meta.get("accession", "") == row["uniprot"]
        for term in (record.text or {}).get("go", []):
            assert onto.canonical(term["id"]) == term["id"] and onto.aspect(term["id"]) == term["aspect"]
            assert term.get("definition", "") == onto.definition(term["id"]).strip()
        table_go = {g for col in ("go_mf", "go_bp", "go_cc") for g in row[col].split(";") if g}
        written = {t["id"] for t in (record.text or {}).get("go", [])}
        dropped = {g for g in table_go if onto.canonical(g) is None}
        assert written == {onto.canonical(g) for g in table_go} - {None} and not (dropped & written)
    assert matched >= 0.95 * len(records)
    for split in ("train", "heldout"):
        report = validate_dir(out / split)
        assert report["ok"], report
        for shard in load_manifest(out / split).shards:
            assert len(shard.sample_props["coverage"]) == shard.num_samples
    train = {r.sequence for r in all_records(out / "train")}
    heldout = {r.sequence for r in all_records(out / "heldout")}
    assert train and heldout and not train & heldout  # identical sequences never straddle the split


@needs_data
def test_real_build_is_deterministic_across_worker_counts(real_build):
    assert shard_hashes(real_build["out"]) == shard_hashes(real_build["again"])
    assert len(shard_hashes(real_build["out"])) >= 4


@needs_data
def test_alphafold_models_with_gaf(tmp_path):
    models = sorted((SHARED / "alphafold").glob("AF-*.pdb.gz"))[:3]
    accession = models[0].name.split("-")[1]
    gaf = tmp_path / "mini.gaf"
    gaf.write_text(
        "!gaf-version: 2.1\n"
        + "\t".join(["MGI", accession, "Olfr1", "", "GO:0004984", "GO_REF:1", "IEA", "", "F"])
        + "\tOlfactory receptor\t\tprotein\ttaxon:10090\t20190101\tMGI\t\t\n"
    )
    summary = build_shards(
        BuildConfig(out=tmp_path / "af", structures=[str(m) for m in models], annotations=[str(gaf)])
    )
    records = {r.id: r for r in all_records(tmp_path / "af")}
    assert summary["splits"]["all"]["coverage"]["plddt"] == 3 and len(records) == 3
    record = records[f"AF-{accession}-F1"]
    assert record.meta["source"] == "alphafold" and record.meta["accession"] == accession
    assert record.backbone.plddt is not None and record.meta["go_evidence"] == ["IEA"]
    assert record.text["name"] == "Olfactory receptor" and record.text["go"][0]["id"] == "GO:0004984"
    assert record.meta["taxon"] == "10090"
