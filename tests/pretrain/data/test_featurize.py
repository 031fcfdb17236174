import math

import pytest
import torch

from pretrain.data.featurize import (
    EDGE_V_DIM,
    NODE_S_DIM,
    NODE_V_DIM,
    _positional,
    backbone_graph,
    chain_positions,
    collate_graphs,
    edge_s_dim,
)
from tests.geometry import random_backbone, random_rotation


def _all_present(length: int) -> torch.Tensor:
    return torch.ones(length, 4, dtype=torch.bool)


def _reference_dihedral(p0, p1, p2, p3) -> float:
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / b1.norm()
    v = b0 - (b0 @ b1) * b1
    w = b2 - (b2 @ b1) * b1
    return math.atan2(float(torch.cross(b1, v, dim=0) @ w), float(v @ w))


def test_shapes_and_dims():
    g = backbone_graph(random_backbone(12), _all_present(12), k_neighbors=5, num_rbf=8, num_positional=6)
    assert g["node_s"].shape == (12, NODE_S_DIM)
    assert g["node_v"].shape == (12, NODE_V_DIM, 3)
    assert g["edge_index"].shape == (2, 12 * 5) and g["edge_index"].dtype == torch.long
    assert g["edge_s"].shape == (60, edge_s_dim(8, 6)) == (60, 14)
    assert g["edge_v"].shape == (60, EDGE_V_DIM, 3)
    assert torch.equal(g["residue_index"], torch.arange(12))


def test_knn_is_nearest_without_self_loops():
    coords = random_backbone(20, seed=1)
    g = backbone_graph(coords, _all_present(20), k_neighbors=4)
    src, dst = g["edge_index"]
    assert not torch.any(src == dst)
    dist = torch.cdist(coords[:, 1], coords[:, 1]) + torch.eye(20) * 1e9
    for i in range(20):
        expected = set(dist[i].topk(4, largest=False).indices.tolist())
        assert set(src[dst == i].tolist()) == expected
    # edge_v points from target to source, unit length
    direction = coords[src, 1] - coords[dst, 1]
    torch.testing.assert_close(g["edge_v"][:, 0], direction / direction.norm(dim=-1, keepdim=True))


def test_k_capped_at_n_minus_one():
    g = backbone_graph(random_backbone(3), _all_present(3), k_neighbors=16)
    assert g["edge_index"].shape == (2, 6)


def test_dihedrals_match_textbook_formula():
    coords = random_backbone(6, seed=2)
    s = backbone_graph(coords, _all_present(6), bonded=torch.ones(5, dtype=torch.bool))["node_s"]
    bb = coords[:, :3]
    for i in range(1, 5):
        phi = _reference_dihedral(bb[i - 1, 2], bb[i, 0], bb[i, 1], bb[i, 2])
        psi = _reference_dihedral(bb[i, 0], bb[i, 1], bb[i, 2], bb[i + 1, 0])
        omega = _reference_dihedral(bb[i, 1], bb[i, 2], bb[i + 1, 0], bb[i + 1, 1])
        expected = torch.tensor([math.cos(phi), math.cos(psi), math.cos(omega)])
        expected = torch.cat([expected, torch.tensor([math.sin(phi), math.sin(psi), math.sin(omega)])])
        torch.testing.assert_close(s[i], expected, atol=1e-5, rtol=0)
    # chain ends: phi of the first residue, psi / omega of the last are undefined -> zero
    assert s[0, [0, 3]].abs().sum() == 0
    assert s[-1, [1, 2, 4, 5]].abs().sum() == 0


def _sorted_edges(g: dict) -> dict:
    """Edges in (target, source) order: neighbour ranks may swap under float round-off."""
    src, dst = g["edge_index"]
    order = torch.argsort(dst * g["node_s"].shape[0] + src)
    return {**g, **{k: g[k][order] for k in ("edge_s", "edge_v")}, "edge_index": g["edge_index"][:, order]}


def test_rigid_motion_invariance():
    coords, mask = random_backbone(15, seed=3), _all_present(15)
    rot = random_rotation(3)
    g1 = _sorted_edges(backbone_graph(coords, mask, k_neighbors=6))
    g2 = _sorted_edges(backbone_graph(coords @ rot.T + torch.tensor([10.0, -4.0, 2.5]), mask, k_neighbors=6))
    assert torch.equal(g1["edge_index"], g2["edge_index"])
    for key in ("node_s", "edge_s"):
        torch.testing.assert_close(g1[key], g2[key], atol=1e-4, rtol=0)
    for key in ("node_v", "edge_v"):
        torch.testing.assert_close(g1[key] @ rot.T, g2[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize("length", [1, 2])
def test_tiny_chains_are_finite(length):
    g = backbone_graph(random_backbone(length), _all_present(length))
    assert g["node_s"].shape[0] == length
    assert g["edge_index"].shape[1] == length * (length - 1)
    assert all(torch.isfinite(v.float()).all() for v in g.values())


@pytest.mark.parametrize(
    "coords",
    [
        torch.zeros(5, 4, 3),  # every atom at the origin
        torch.arange(60, dtype=torch.float32).reshape(5, 4, 3).div(60).mul(torch.tensor([1.0, 0.0, 0.0])),
        torch.ones(5, 4, 3),  # coincident residues
    ],
    ids=["origin", "collinear", "coincident"],
)
def test_degenerate_coordinates_are_finite(coords):
    g = backbone_graph(coords, _all_present(5))
    assert all(torch.isfinite(v.float()).all() for v in g.values())


def test_missing_atoms():
    coords, mask = random_backbone(8, seed=4), _all_present(8)
    coords[3, 1] = float("nan")  # CA of residue 3 missing (and non-finite)
    mask[3, 1] = False
    mask[5, 3] = False  # O missing: residue kept
    coords[6, 0] = float("inf")  # non-finite N counts as missing even with mask True
    g = backbone_graph(coords, mask, k_neighbors=3, bonded=torch.ones(7, dtype=torch.bool))
    assert g["residue_index"].tolist() == [0, 1, 2, 4, 5, 7]
    assert all(torch.isfinite(v.float()).all() for v in g.values())
    s, v = g["node_s"], g["node_v"]
    # residue 2: omega needs residue 3's CA (psi only its N); so does the forward CA vector
    assert s[2, [2, 5]].abs().sum() == 0 and s[2, [1, 4]].abs().sum() > 0 and v[2, 0].abs().sum() == 0
    # residue 4 (node 3): phi needs residue 3's C (present) -> defined; backward vector is zero
    assert s[3, [0, 3]].abs().sum() > 0 and v[3, 1].abs().sum() == 0
    # edge offsets use original residue numbers
    offset_ok = backbone_graph(coords, mask, k_neighbors=5, num_rbf=1, num_positional=2)
    src, dst = offset_ok["edge_index"]
    offsets = (offset_ok["residue_index"][src] - offset_ok["residue_index"][dst]).float()
    torch.testing.assert_close(offset_ok["edge_s"][:, 1], torch.cos(offsets))


def test_all_residues_missing_gives_empty_graph():
    g = backbone_graph(random_backbone(4), torch.zeros(4, 4, dtype=torch.bool))
    assert g["node_s"].shape == (0, NODE_S_DIM) and g["edge_index"].shape == (2, 0)


def test_collate_offsets_and_missing_entries():
    g1 = backbone_graph(random_backbone(5), _all_present(5), k_neighbors=2)
    g2 = backbone_graph(random_backbone(3, seed=1), _all_present(3), k_neighbors=2)
    empty = backbone_graph(random_backbone(2), torch.zeros(2, 4, dtype=torch.bool))
    batch = collate_graphs([g1, None, g2, empty])
    assert batch["num_graphs"].ndim == 0 and int(batch["num_graphs"]) == 4
    assert batch["present"].tolist() == [True, False, True, False]
    assert batch["batch"].tolist() == [0] * 5 + [2] * 3
    assert batch["node_s"].shape == (8, NODE_S_DIM)
    assert torch.equal(batch["edge_index"][:, :10], g1["edge_index"])
    assert torch.equal(batch["edge_index"][:, 10:], g2["edge_index"] + 5)
    assert torch.equal(batch["edge_s"], torch.cat([g1["edge_s"], g2["edge_s"]]))


def test_collate_all_missing_and_empty():
    batch = collate_graphs([None, None], edge_dim=12)
    assert int(batch["num_graphs"]) == 2 and batch["present"].tolist() == [False, False]
    assert batch["node_s"].shape == (0, NODE_S_DIM) and batch["edge_s"].shape == (0, 12)
    assert batch["batch"].shape == (0,) and batch["edge_index"].shape == (2, 0)
    nothing = collate_graphs([])
    assert int(nothing["num_graphs"]) == 0 and nothing["edge_s"].shape == (0, edge_s_dim())


def test_nothing_is_measured_across_a_chain_break():
    """Unobserved residues between two observed ones (C-N far apart) zero the spanning features."""
    t = torch.arange(40, dtype=torch.float32) * 0.9
    coords = torch.stack([2.3 * torch.cos(t), 2.3 * torch.sin(t), 0.5 * t], -1).reshape(10, 4, 3)
    coords[5:] += torch.tensor([15.0, 0.0, 0.0])  # residues 5.. moved away: a break after residue 4
    g = backbone_graph(coords, _all_present(10))
    s, v = g["node_s"], g["node_v"]
    assert s[4, [1, 2, 4, 5]].abs().sum() == 0 and v[4, 0].abs().sum() == 0  # psi, omega, forward
    assert s[5, [0, 3]].abs().sum() == 0 and v[5, 1].abs().sum() == 0  # phi, backward


def test_chain_positions_count_the_residues_a_break_hides():
    bonded = torch.tensor([True, False, True, False, False])
    assert chain_positions(bonded).tolist() == [0, 1, 2, 3, 4, 5]  # no numbers: record positions
    numbers = torch.tensor([10, 11, 20, 21, 21, 5])  # a 9-residue gap, an insertion code, renumbering
    assert chain_positions(bonded, numbers).tolist() == [0, 1, 10, 11, 12, 13]
    # bonded by geometry: one step, whatever the numbering says (a renumbered construct)
    assert chain_positions(torch.ones(5, dtype=torch.bool), numbers).tolist() == [0, 1, 2, 3, 4, 5]


def test_edge_offsets_across_a_break_follow_the_author_numbering():
    t = torch.arange(40, dtype=torch.float32) * 0.9
    coords = torch.stack([2.3 * torch.cos(t), 2.3 * torch.sin(t), 0.5 * t], -1).reshape(10, 4, 3)
    coords[5:] += torch.tensor([6.0, 0.0, 0.0])  # a break after residue 4, close enough for k-NN edges
    numbers = torch.tensor([1, 2, 3, 4, 5, 17, 18, 19, 20, 21])  # 11 residues unobserved in between
    g = backbone_graph(coords, _all_present(10), num_rbf=16, num_positional=16, numbers=numbers)
    src, dst = g["edge_index"]
    position = torch.tensor([0, 1, 2, 3, 4, 16, 17, 18, 19, 20])
    expected = _positional(position[src] - position[dst], 16)
    torch.testing.assert_close(g["edge_s"][:, 16:], expected)
    across = (src < 5) != (dst < 5)
    assert across.any() and ((position[src] - position[dst])[across].abs() >= 12).all()
    plain = backbone_graph(coords, _all_present(10), num_rbf=16, num_positional=16)
    assert not torch.allclose(plain["edge_s"][across, 16:], g["edge_s"][across, 16:])
