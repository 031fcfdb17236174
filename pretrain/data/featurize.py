"""Protein backbone -> GVP graph features, and graph collation.

Follows the featurisation of GVP-GNN (Jing et al., ICLR 2021; "Equivariant Graph Neural
Networks for 3D Macromolecular Structure", 2021), written in pure torch for CPU data workers:

* nodes: backbone dihedrals (phi, psi, omega) as sin/cos scalars; forward / backward CA unit
  vectors and the imputed CB direction as vector channels;
* edges: the k nearest residues by CA distance (``torch.cdist`` + ``topk``: torch-cluster and
  pyg-lib are not installable here), with an RBF of the distance and a sinusoidal encoding of
  the sequence offset as scalars and the unit direction as the vector channel.

Residues whose N, CA or C is missing (mask False or non-finite coordinates) are dropped.
Features that depend on a missing atom or a missing neighbour residue (a dihedral across a
gap, the forward vector of a residue before a gap, chain ends) are set to zero rather than
computed across the gap. Readers keep only the observed residues, so two neighbours in a record
may lie far apart with a disordered loop between them: where C(i)-N(i+1) (> 2 Å) or CA(i)-CA(i+1)
(> 4.5 Å) is too long for a peptide bond, the chain counts as broken and nothing is measured across
it either (``peptide_bonds``). Edge sequence offsets count the residues of such a gap from the
author numbering when the shard stores it (``chain_positions``). The O atom is not used
by these features, so a missing O changes nothing. Every division is guarded, so L=1, L=2 and
degenerate (coincident / collinear) coordinates give finite features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pretrain.models.graph_format import EDGE_V_DIM, NODE_S_DIM, NODE_V_DIM, edge_s_dim  # noqa: F401 (the format built here)

_EPS = 1e-8
_RBF_MAX_DISTANCE = 20.0  # Angstrom; RBF centres span [0, 20]
# Consecutive residues farther apart than this are not bonded (unobserved residues between them):
# C(i)-N(i+1) is 1.33 A in a peptide bond, CA(i)-CA(i+1) 3.8 A (2.9 A cis).
_MAX_PEPTIDE_BOND = 2.0
_MAX_CA_STEP = 4.5


def _normalize(x: Tensor, dim: int = -1) -> Tensor:
    """Unit vectors along ``dim``; zero vectors stay zero (no NaN)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(_EPS)


def usable_atoms(coords: Tensor, atom_mask: Tensor) -> Tensor:
    """Atoms that exist (mask True) and have finite coordinates.

    Shapes:
        coords (L, 4, 3), atom_mask (L, 4) -> (L, 4) bool
    """
    return torch.as_tensor(atom_mask, dtype=torch.bool) & torch.isfinite(torch.as_tensor(coords)).all(-1)


def graph_residues(coords: Tensor, atom_mask: Tensor) -> Tensor:
    """Residues that become graph nodes: N, CA and C usable (:func:`backbone_graph`).

    Shapes:
        coords (L, 4, 3), atom_mask (L, 4) -> (L,) bool
    """
    return usable_atoms(coords, atom_mask)[:, :3].all(-1)


def peptide_bonds(coords: Tensor, atom_mask: Tensor) -> Tensor:
    """Whether residues i and i+1 are bonded: False where C(i)-N(i+1) or CA(i)-CA(i+1) is too long.

    Readers keep observed residues only, so a disordered loop leaves two record-adjacent residues
    that are not bonded. Unknown (an atom missing) counts as bonded.

    Shapes:
        coords (L, 4, 3), atom_mask (L, 4) -> (max(L - 1, 0),) bool
    """
    coords = torch.as_tensor(coords, dtype=torch.float32)
    ok = usable_atoms(coords, atom_mask)
    if coords.shape[0] < 2:
        return torch.ones(0, dtype=torch.bool)
    peptide = (coords[:-1, 2] - coords[1:, 0]).norm(dim=-1)
    step = (coords[:-1, 1] - coords[1:, 1]).norm(dim=-1)
    broken = (ok[:-1, 2] & ok[1:, 0] & ~(peptide <= _MAX_PEPTIDE_BOND)) | (
        ok[:-1, 1] & ok[1:, 1] & ~(step <= _MAX_CA_STEP)
    )
    return ~broken


def chain_positions(bonded: Tensor, numbers: Tensor | None = None) -> Tensor:
    """Each residue's position along the chain, counting the unobserved residues of gaps.

    Record neighbours joined by a peptide bond are one residue apart. Across a chain break the
    author numbering tells how many residues the gap hides (at least one step); without numbers
    (``None``: shards written before they were stored) every step counts one.

    Shapes:
        bonded (L - 1,) bool, numbers (L,) int -> (L,) long, starting at 0
    """
    bonded = torch.as_tensor(bonded, dtype=torch.bool)
    steps = torch.ones(bonded.shape[0], dtype=torch.long)  # (L - 1,)
    if numbers is not None:
        numbers = torch.as_tensor(numbers, dtype=torch.long)
        jump = (numbers[1:] - numbers[:-1]).clamp_min(1)  # insertion codes / renumbering: one step
        steps = torch.where(bonded, steps, jump)
    return torch.cat([torch.zeros(1, dtype=torch.long), steps.cumsum(0)])


def _dihedral_features(bb: Tensor, atom_ok: Tensor, bonded: Tensor) -> Tensor:
    """sin/cos of phi, psi, omega for every residue of the full chain.

    Args:
        bb: backbone N, CA, C coordinates, missing atoms already zeroed.
        atom_ok: which of those atoms are present.

    Shapes:
        bb (L, 3, 3), atom_ok (L, 3) -> (L, 6)

    Returns:
        ``[cos phi, cos psi, cos omega, sin phi, sin psi, sin omega]`` per residue; zero where the
        dihedral is undefined (chain end, missing atom, degenerate geometry).
    """
    length = bb.shape[0]
    x = bb.reshape(3 * length, 3)  # (3L, 3) N0 CA0 C0 N1 ...
    ok = atom_ok.reshape(3 * length)  # (3L,)
    if length < 2:
        return bb.new_zeros(length, 6)
    u = _normalize(x[1:] - x[:-1])  # (3L-1, 3) bond directions
    u2, u1, u0 = u[:-2], u[1:-1], u[2:]  # (3L-3, 3) each
    n2 = _normalize(torch.cross(u2, u1, dim=-1))
    n1 = _normalize(torch.cross(u1, u0, dim=-1))
    cos = (n2 * n1).sum(-1)  # (3L-3,)
    sin = (torch.cross(n2, n1, dim=-1) * u1).sum(-1)  # (3L-3,) signed
    # The torsion over atoms (a, a+1, a+2, a+3) is valid iff all four atoms exist and the two
    # planes are well defined (non-zero normals).
    valid = ok[:-3] & ok[1:-2] & ok[2:-1] & ok[3:]
    link = torch.ones(3 * length - 1, dtype=torch.bool)  # atom a -> a+1 bonded
    link[2::3] = bonded  # C(i) -> N(i+1)
    valid = valid & link[:-2] & link[1:-1] & link[2:]
    valid = valid & (n2.norm(dim=-1) > 0.5) & (n1.norm(dim=-1) > 0.5)
    cos = torch.where(valid, cos, torch.zeros_like(cos))
    sin = torch.where(valid, sin, torch.zeros_like(sin))
    # Torsion a starts at atom a; residue i's phi starts at C_{i-1} (atom 3i-1), psi at N_i
    # (3i), omega at CA_i (3i+1): pad one slot in front and two at the back.
    cos = torch.nn.functional.pad(cos, (1, 2)).reshape(length, 3)  # (L, 3)
    sin = torch.nn.functional.pad(sin, (1, 2)).reshape(length, 3)  # (L, 3)
    return torch.cat([cos, sin], dim=-1)  # (L, 6)


def _orientation_features(ca: Tensor, ca_ok: Tensor, bonded: Tensor) -> Tensor:
    """Unit vectors to the next and previous CA; zero at chain ends and gaps.

    Shapes:
        ca (L, 3), ca_ok (L,) -> (L, 2, 3)
    """
    forward = torch.zeros_like(ca)
    backward = torch.zeros_like(ca)
    if ca.shape[0] > 1:
        pair_ok = (ca_ok[1:] & ca_ok[:-1] & bonded).unsqueeze(-1)  # (L-1, 1)
        step = _normalize(ca[1:] - ca[:-1]) * pair_ok  # (L-1, 3)
        forward[:-1] = step
        backward[1:] = -step
    return torch.stack([forward, backward], dim=-2)


def _cb_direction(n: Tensor, ca: Tensor, c: Tensor) -> Tensor:
    """Imputed CB direction from ideal tetrahedral geometry.

    Shapes:
        n, ca, c (L, 3) -> (L, 3)
    """
    to_c = _normalize(c - ca)
    to_n = _normalize(n - ca)
    bisector = _normalize(to_c + to_n)
    perp = _normalize(torch.cross(to_c, to_n, dim=-1))
    return -bisector * math.sqrt(1.0 / 3.0) - perp * math.sqrt(2.0 / 3.0)


def _rbf(distance: Tensor, num_rbf: int) -> Tensor:
    """Gaussian radial basis of distances. Shapes: (E,) -> (E, num_rbf)."""
    centres = torch.linspace(0.0, _RBF_MAX_DISTANCE, num_rbf, dtype=distance.dtype)
    width = _RBF_MAX_DISTANCE / num_rbf
    return torch.exp(-(((distance.unsqueeze(-1) - centres) / width) ** 2))


def _positional(offset: Tensor, num_positional: int) -> Tensor:
    """Sinusoidal encoding of signed sequence offsets. Shapes: (E,) -> (E, num_positional)."""
    freq = torch.exp(
        torch.arange(0, num_positional, 2, dtype=torch.float32) * -(math.log(10000.0) / num_positional)
    )  # (num_positional / 2,)
    angles = offset.to(torch.float32).unsqueeze(-1) * freq  # (E, num_positional / 2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _knn_edges(ca: Tensor, k_neighbors: int) -> Tensor:
    """k nearest neighbours by CA distance, no self loops.

    Shapes:
        ca (N, 3) -> edge_index (2, N * min(k, N - 1)); row 0 is the neighbour j (source), row 1
        the centre i (target), as torch-geometric's ``knn_graph`` with ``flow="source_to_target"``.
    """
    num_nodes = ca.shape[0]
    k = min(k_neighbors, num_nodes - 1)
    if k <= 0:
        return torch.zeros(2, 0, dtype=torch.long)
    dist = torch.cdist(ca.unsqueeze(0), ca.unsqueeze(0)).squeeze(0)  # (N, N)
    dist.fill_diagonal_(float("inf"))
    neighbours = dist.topk(k, dim=-1, largest=False).indices  # (N, k) sorted nearest first
    target = torch.arange(num_nodes).repeat_interleave(k)  # (N * k,)
    return torch.stack([neighbours.reshape(-1), target])  # (2, E)


def backbone_graph(
    coords: Tensor,
    atom_mask: Tensor,
    k_neighbors: int = 16,
    num_rbf: int = 16,
    num_positional: int = 16,
    bonded: Tensor | None = None,
    numbers: Tensor | None = None,
) -> dict[str, Tensor]:
    """Featurise one protein backbone as a GVP graph.

    Args:
        coords: N, CA, C, O coordinates in Angstrom (float; any float dtype is cast to float32).
        atom_mask: which atoms are present; non-finite coordinates also count as missing.
        k_neighbors: neighbours per residue (capped at ``N - 1``).
        num_rbf: radial basis functions for edge distances.
        num_positional: sinusoidal channels for the sequence offset (must be even).
        bonded: (L - 1,) chain continuity (default :func:`peptide_bonds` of ``coords``); pass the
            clean chain's when ``coords`` carry augmentation noise.
        numbers: (L,) author residue numbers, which size the gaps at chain breaks for the edge
            sequence offsets (:func:`chain_positions`); None counts record positions.

    Shapes:
        coords (L, 4, 3), atom_mask (L, 4)

    Returns:
        dict with ``node_s`` (N, 6), ``node_v`` (N, 3, 3), ``edge_index`` (2, E) long,
        ``edge_s`` (E, num_rbf + num_positional), ``edge_v`` (E, 1, 3) and ``residue_index`` (N,)
        long (position of each kept residue in the input, so residue-level objectives can map
        nodes back to sequence positions). N is the number of residues with N, CA and C present.
    """
    if num_positional % 2:
        raise ValueError(f"num_positional must be even, got {num_positional}")
    coords = torch.as_tensor(coords, dtype=torch.float32)
    atom_mask = torch.as_tensor(atom_mask, dtype=torch.bool)
    if coords.ndim != 3 or coords.shape[1:] != (4, 3) or atom_mask.shape != coords.shape[:2]:
        raise ValueError(
            f"expected coords (L, 4, 3) and atom_mask (L, 4), got {tuple(coords.shape)} and {tuple(atom_mask.shape)}"
        )
    atom_ok = usable_atoms(coords, atom_mask)  # (L, 4)
    coords = torch.where(atom_ok.unsqueeze(-1), coords, torch.zeros_like(coords))  # (L, 4, 3)
    bb, bb_ok = coords[:, :3], atom_ok[:, :3]  # (L, 3, 3), (L, 3)
    n, ca, c = bb.unbind(dim=1)  # (L, 3) each
    if bonded is None:
        bonded = peptide_bonds(coords, atom_ok)
    bonded = torch.as_tensor(bonded, dtype=torch.bool)

    # Computed on the full chain so that nothing is measured across a dropped residue.
    dihedrals = _dihedral_features(bb, bb_ok, bonded)  # (L, 6)
    orientations = _orientation_features(ca, bb_ok[:, 1], bonded)  # (L, 2, 3)
    cb = _cb_direction(n, ca, c).unsqueeze(-2)  # (L, 1, 3)

    keep = bb_ok.all(-1)  # (L,) as graph_residues
    residue_index = keep.nonzero().squeeze(-1)  # (N,)
    ca = ca[residue_index]  # (N, 3)
    edge_index = _knn_edges(ca, k_neighbors)  # (2, E)
    src, dst = edge_index
    vectors = ca[src] - ca[dst]  # (E, 3)
    position = chain_positions(bonded, numbers)[residue_index]  # (N,)
    offset = position[src] - position[dst]  # (E,) signed sequence separation
    edge_s = torch.cat([_rbf(vectors.norm(dim=-1), num_rbf), _positional(offset, num_positional)], -1)
    node_v = torch.cat([orientations, cb], dim=-2)[residue_index]  # (N, 3, 3)
    return {
        "node_s": dihedrals[residue_index],  # (N, 6)
        "node_v": node_v,
        "edge_index": edge_index,
        "edge_s": edge_s,  # (E, num_rbf + num_positional)
        "edge_v": _normalize(vectors).unsqueeze(-2),  # (E, 1, 3)
        "residue_index": residue_index,
    }


def _empty_graph(edge_dim: int) -> dict[str, Tensor]:
    """A graph with no nodes, standing in for a missing structure."""
    return {
        "node_s": torch.zeros(0, NODE_S_DIM),
        "node_v": torch.zeros(0, NODE_V_DIM, 3),
        "edge_index": torch.zeros(2, 0, dtype=torch.long),
        "edge_s": torch.zeros(0, edge_dim),
        "edge_v": torch.zeros(0, EDGE_V_DIM, 3),
        "residue_index": torch.zeros(0, dtype=torch.long),
    }


def collate_graphs(graphs: list[dict[str, Tensor] | None], edge_dim: int | None = None) -> dict[str, Tensor]:
    """Batch graphs from :func:`backbone_graph` into one disjoint graph.

    Args:
        graphs: one entry per sample; ``None`` marks a sample without a structure.
        edge_dim: scalar edge width used for the empty tensors when no graph is given
            (default: inferred from the graphs, else :func:`edge_s_dim` with defaults).

    Returns:
        The concatenated node / edge tensors with ``edge_index`` offset per graph, plus
        ``batch`` (N,) long graph id in [0, B), ``num_graphs`` 0-dim long (= B = len(graphs)) and
        ``present`` (B,) bool: False for ``None`` entries and for graphs with no residue left;
        those graphs contribute zero nodes.
    """
    if edge_dim is None:
        given = [g for g in graphs if g is not None]
        edge_dim = given[0]["edge_s"].shape[-1] if given else edge_s_dim()
    parts = [g if g is not None else _empty_graph(edge_dim) for g in graphs]
    sizes = torch.tensor([g["node_s"].shape[0] for g in parts], dtype=torch.long)  # (B,)
    offsets = torch.cumsum(sizes, 0) - sizes  # (B,)
    out = {
        key: torch.cat([g[key] for g in parts], dim=0) if parts else _empty_graph(edge_dim)[key]
        for key in ("node_s", "node_v", "edge_s", "edge_v", "residue_index")
    }
    edge_parts = [g["edge_index"] + off for g, off in zip(parts, offsets.tolist())]
    out["edge_index"] = torch.cat(edge_parts, dim=1) if parts else torch.zeros(2, 0, dtype=torch.long)
    out["batch"] = torch.repeat_interleave(torch.arange(len(parts)), sizes)  # (N,)
    out["num_graphs"] = torch.tensor(len(parts), dtype=torch.long)
    out["present"] = torch.tensor([g is not None for g in graphs], dtype=torch.bool) & (sizes > 0)
    return out
