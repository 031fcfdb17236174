"""Profile one training step of the structure encoder on CPU: featurise, k-NN, message passing, backward.

What runs (fp32, training mode, random weights; the recipes' sizes from ``--recipe``):

- featurise: :func:`pretrain.data.featurize.backbone_graph` per protein, then ``collate_graphs``
  (what the data workers do per batch); the k-NN part of it (``_knn_edges``) is also timed alone;
- forward: ``StructureEncoder`` (node / edge embedding, ``--layers`` GVPConv layers, read-out, pooling);
  "message passing" is the time inside the GVPConv layers' graph convolutions (gather, message
  GVPs, mean aggregation), measured with ``torch.profiler.record_function`` ranges;
- backward: of a fixed random functional of the pooled output.

Proteins: real chains from ``/work/shared/data/structures`` (listed in ``annotations/pdb_chains.tsv``,
read with the gemmi reader of ``data_shards``): for each of ``--lengths`` the ``--batch`` chains at
least L long (cropped to L), then the longest shorter ones; else, when the data is absent,
random-walk backbones of exactly L residues (``--synthetic`` forces these).

Output: per length, the median / min / max over ``--repeats`` of each phase's wall time (after one
warm-up) and of the step's process CPU time (``step_cpu``: featurise + forward + backward; on a shared
machine it is steadier than wall time with ``--threads 1``), the activation memory autograd keeps for
the backward (``saved for bwd``), then the top operators by self CPU time from one profiled step.

    python benchmarks/structure_profile.py --recipe configs/recipes/align_pro_650M.yaml \
        --lengths 128 512 1022 --batch 4 --layers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import gzip  # noqa: F401 (the reader opens gzipped files; imported here to fail early if missing)
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parameter_storages, saved_activation_bytes  # noqa: E402

DATA = Path("/work/shared/data/structures")
PHASES = ("featurise", "knn", "forward", "message_passing", "backward", "step", "step_cpu")


def _load_yaml_structure(recipe: Path) -> dict:
    """The ``model.structure`` section of a recipe YAML."""
    import yaml

    with open(recipe) as f:
        cfg = yaml.safe_load(f)
    try:
        return dict(cfg["model"]["structure"])
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{recipe}: no model.structure section") from err


def _random_backbone(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-walk backbone (L, 4, 3) with 3.8 Å CA steps; all atoms present."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(length, 3, generator=gen)
    ca = (3.8 * steps / steps.norm(dim=-1, keepdim=True)).cumsum(0)
    coords = ca.unsqueeze(1) + 1.3 * torch.randn(length, 4, 3, generator=gen)
    coords[:, 1] = ca
    return coords, torch.ones(length, 4, dtype=torch.bool)


def _table_rows() -> list[tuple[int, Path, str]]:
    """(observed length, structure file, chain) of every row of the shared ``pdb_chains.tsv``."""
    import csv

    table = DATA.parent / "annotations" / "pdb_chains.tsv"
    if not table.is_file():
        return []
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(len(r["sequence"]), (table.parent / r["structure_file"]).resolve(), r["chain"]) for r in rows]


def _read_chain(path: Path, chain_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """coords (L, 4, 3), atom_mask (L, 4) of one chain, or None when it cannot be read."""
    from data_shards.readers.structures import StructureError, read_structure

    try:
        chain = read_structure(path, chains={chain_id}).chain(chain_id)
    except (StructureError, OSError, ValueError):
        return None
    if chain is None:
        return None
    bb = chain.backbone
    return torch.as_tensor(bb.coords, dtype=torch.float32), torch.as_tensor(bb.atom_mask, dtype=torch.bool)


def pick_proteins(lengths: list[int], batch: int, synthetic: bool) -> dict[int, list[tuple]]:
    """For each L, ``batch`` proteins (name, coords, mask) of (about) L residues.

    Real chains: those of ``pdb_chains.tsv`` at least L long (cropped to L), then the longest
    shorter ones; random-walk backbones of L residues when the data is absent or ``synthetic``.
    """
    rows = [] if synthetic or not DATA.is_dir() else _table_rows()
    picked = {}
    for length in lengths:
        ranked = sorted(rows, key=lambda r: (r[0] < length, abs(r[0] - length)))
        proteins = []
        for _, path, chain_id in ranked:
            if len(proteins) == batch:
                break
            read = _read_chain(path, chain_id)
            if read is not None:
                proteins.append((f"{path.name}:{chain_id}", read[0][:length], read[1][:length]))
        if len(proteins) < batch:
            proteins = [(f"random-walk-{length}-{i}", *_random_backbone(length, i)) for i in range(batch)]
        picked[length] = proteins
    return picked


def _featurise(proteins, cfg) -> dict:
    from pretrain.data.featurize import backbone_graph, collate_graphs

    graphs = [
        backbone_graph(c, m, k_neighbors=cfg.k_neighbors, num_rbf=cfg.num_rbf, num_positional=cfg.num_positional)
        for _, c, m in proteins
    ]
    return collate_graphs(graphs)


def _knn_only(proteins, cfg) -> None:
    from pretrain.data.featurize import _knn_edges, graph_residues

    for _, c, m in proteins:
        keep = graph_residues(c, m)
        _knn_edges(torch.as_tensor(c, dtype=torch.float32)[keep, 1], cfg.k_neighbors)


def _instrument(encoder) -> None:
    """Wrap each GVPConv's forward in a profiler range named ``message_passing``."""
    for layer in encoder.layers:
        conv = layer.conv
        inner = conv.forward

        def wrapped(*args, _inner=inner, **kwargs):
            with torch.profiler.record_function("message_passing"):
                return _inner(*args, **kwargs)

        conv.forward = wrapped


def one_step(encoder, proteins, cfg, weights, timings: dict | None, knn: bool = True) -> None:
    """Featurise + forward + backward of one batch; phase wall times into ``timings``.

    ``knn``: also run the k-NN search alone (timed as its own phase, outside the step's total).
    """
    c0 = time.process_time()
    t0 = time.perf_counter()
    with torch.profiler.record_function("featurise"):
        graph = _featurise(proteins, cfg)
    t1 = time.perf_counter()
    c1 = time.process_time()
    if knn:
        with torch.profiler.record_function("knn"):
            _knn_only(proteins, cfg)
    t2 = time.perf_counter()
    c2 = time.process_time()
    encoder.zero_grad(set_to_none=True)
    with torch.profiler.record_function("forward"):
        pooled = encoder(graph)  # (B, D)
    t3 = time.perf_counter()
    with torch.profiler.record_function("backward"):
        (pooled * weights).sum().backward()
    t4 = time.perf_counter()
    c4 = time.process_time()
    if timings is not None:
        timings["featurise"].append(t1 - t0)
        timings["knn"].append(t2 - t1)
        timings["forward"].append(t3 - t2)
        timings["backward"].append(t4 - t3)
        timings["step"].append((t1 - t0) + (t4 - t2))  # wall: featurise + forward + backward
        timings["step_cpu"].append(c4 - c0 - (c2 - c1))  # process CPU time of the same


def message_passing_time(encoder, proteins, cfg, weights, repeats: int) -> list[float]:
    """Seconds per forward spent inside the GVPConv graph convolutions (profiler ranges), per repeat."""
    graph = _featurise(proteins, cfg)
    out = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            encoder(graph)
        total_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "message_passing")
        out.append(total_us / 1e6)
    return out


def saved_megabytes(encoder, proteins, cfg) -> float:
    """MB of distinct storages autograd saves for the backward in one forward (parameters excluded).

    The activation memory of a step, the part that grows with the batch's edges
    (``saved_activation_bytes`` of ``benchmarks/_common.py``).
    """
    graph = _featurise(proteins, cfg)
    return saved_activation_bytes(lambda: encoder(graph), parameter_storages(encoder)) / 2**20


def _fmt(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):8.1f} [{1e3 * min(values):.1f}, {1e3 * max(values):.1f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "configs/recipes/align_pro_650M.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1022])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="GVPConv layers (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="operators listed by self CPU time")
    parser.add_argument("--synthetic", action="store_true", help="random-walk backbones even when data exists")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-profile", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pretrain.models.structure_encoder import StructureEncoder, StructureEncoderConfig

    section = _load_yaml_structure(args.recipe)
    if args.layers is not None:
        section["num_layers"] = args.layers
    cfg = StructureEncoderConfig(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in section.items()
            if k in StructureEncoderConfig.__dataclass_fields__
        }
    )
    cfg.validate()
    print(
        f"structure encoder: node {cfg.node_hidden}, edge {cfg.edge_hidden}, {cfg.num_layers} layers, "
        f"k = {cfg.k_neighbors} ({args.recipe.name}); batch {args.batch}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    picked = pick_proteins(args.lengths, args.batch, args.synthetic)
    torch.manual_seed(0)
    encoder = StructureEncoder(cfg).train()
    _instrument(encoder)
    weights = torch.randn(args.batch, encoder.output_dim)

    for length, proteins in picked.items():
        sizes = [int(c.shape[0]) for _, c, _ in proteins]
        print(f"\n== L = {length}: {', '.join(f'{n} ({s})' for (n, _, _), s in zip(proteins, sizes))}")
        torch.manual_seed(1)
        one_step(encoder, proteins, cfg, weights, None)  # warm-up
        timings = {phase: [] for phase in PHASES}
        for _ in range(args.repeats):
            torch.manual_seed(1)
            one_step(encoder, proteins, cfg, weights, timings)
        timings["message_passing"] = message_passing_time(encoder, proteins, cfg, weights, args.repeats)
        print(f"{'phase':<16} {'median ms [min, max]':>28}")
        for phase in PHASES:
            print(f"{phase:<16} {_fmt(timings[phase]):>28}")
        print(f"{'saved for bwd':<16} {saved_megabytes(encoder, proteins, cfg):>17.1f} MB")
        if args.no_profile:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.manual_seed(1)
            one_step(encoder, proteins, cfg, weights, None, knn=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
