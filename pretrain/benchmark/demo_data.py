"""Benchmark files from demo (or any) shards: ``python -m pretrain.benchmark.demo_data --train T --test H --out DIR``.

Writes what ``configs/benchmarks/demo.yaml`` names, from a training and a held-out shard set:

* ``proteins.tsv``: id, sequence, structure_file (a PDB file per backbone, ``structures/<id>.pdb``,
  chain A), chain, text (the canonical text);
* ``classes.tsv``: id, ``family``, ``subfamily`` (the demo corpus' latent classes, from ``meta``),
  split (train / test);
* ``ec_annot.tsv``: the proteins' EC numbers in DeepFRI's annotation format (vocabulary: every EC
  number seen), with ``train.txt`` / ``test.txt`` id lists.

The demo classes are synthetic; the files only exercise the benchmark end to end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_shards.manifest import load_manifest
from data_shards.reader import ShardReader
from pretrain.eval.embed import read_annotations

_ATOMS = ("N", "CA", "C", "O")
_THREE = {
    "A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE",
    "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER",
    "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR",
}  # fmt: skip


def write_pdb(path: Path, sequence: str, coords: np.ndarray, mask: np.ndarray, chain: str = "A") -> None:
    """A backbone-only PDB file (ATOM records for the observed N, CA, C, O).

    Shapes:
        coords (L, 4, 3) Å, mask (L, 4) bool; L == len(sequence).
    """
    lines, serial = [], 1
    for i, aa in enumerate(sequence):
        res = _THREE.get(aa, "UNK")
        for a, name in enumerate(_ATOMS):
            if not mask[i, a]:
                continue
            x, y, z = (float(v) for v in coords[i, a])
            lines.append(
                f"ATOM  {serial:5d} {name:<4s} {res:3s} {chain}{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"
                f"           {name[0]}"
            )
            serial += 1
    lines += ["TER", "END"]
    path.write_text("\n".join(lines) + "\n")


def _records(shards: Path):
    """Every record of a shard set, in manifest order."""
    for shard in load_manifest(shards).shards:
        reader = ShardReader(str(shard.path))
        try:
            for i in range(shard.num_samples):
                yield reader.read(i)
        finally:
            reader.close()


def write_demo_benchmark(train: Path, test: Path, out: Path) -> dict[str, int]:
    """Write the benchmark files (module docstring) for shard sets ``train`` and ``test`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "structures").mkdir(exist_ok=True)
    texts = {}
    for shards in (train, test):
        ann = read_annotations(shards)
        texts.update(zip(ann.ids, ann.texts))
    proteins, classes, ec, split_ids = [], [], {}, {"train": [], "test": []}
    for split, shards in (("train", train), ("test", test)):
        for rec in _records(shards):
            if not rec.sequence:
                continue
            structure = ""
            if rec.backbone is not None:
                structure = f"structures/{rec.id}.pdb"
                write_pdb(out / structure, rec.sequence, rec.backbone.coords, rec.backbone.atom_mask)
            text = " ".join(texts.get(rec.id, "").split())
            proteins.append(f"{rec.id}\t{rec.sequence}\t{structure}\t{'A' if structure else ''}\t{text}")
            meta = rec.meta or {}
            classes.append(f"{rec.id}\t{meta.get('family', '')}\t{meta.get('subfamily', '')}\t{split}")
            numbers = [e for e in (rec.text or {}).get("ec") or [] if e]
            if numbers:
                ec[rec.id] = numbers
                split_ids[split].append(rec.id)
    (out / "proteins.tsv").write_text("id\tsequence\tstructure_file\tchain\ttext\n" + "\n".join(proteins) + "\n")
    (out / "classes.tsv").write_text("id\tfamily\tsubfamily\tsplit\n" + "\n".join(classes) + "\n")
    vocab = sorted({e for v in ec.values() for e in v})
    rows = "".join(f"{pid}\t{','.join(v)}\n" for pid, v in ec.items())
    (out / "ec_annot.tsv").write_text(f"### EC-numbers\n{chr(9).join(vocab)}\n### PDB-chain\tEC-numbers\n{rows}")
    for split, ids in split_ids.items():
        (out / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"proteins": len(proteins), "ec_annotated": len(ec), "ec_labels": len(vocab)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.benchmark.demo_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training shard directory (e.g. data/demo/train)")
    p.add_argument("--test", required=True, help="held-out shard directory (e.g. data/demo/heldout)")
    p.add_argument("--out", required=True, help="output directory (the demo suite's data_root)")
    args = p.parse_args(argv)
    counts = write_demo_benchmark(Path(args.train), Path(args.test), Path(args.out))
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
