import pytest
import torch

from pretrain.data.featurize import backbone_graph, collate_graphs
from pretrain.models.structure_encoder import GVP, GVPConv, StructureEncoder, StructureEncoderConfig, _TupleLayerNorm
from tests.geometry import random_backbone, random_rotation

# StructureEncoder(node (24, 6), edge (12, 2), 2 layers, k 8) after torch.manual_seed(0), eval mode, on
# _graph(20, seed=11) and _graph(9, seed=12): the first 6 pooled channels, as the unsplit per-edge
# GVPConv (before the node/edge split of the first message GVP) computed them.
SAVED_POOLED = torch.tensor(
    [
        [
            -0.6529161930084229,
            -0.08104432374238968,
            0.03835354000329971,
            0.22301897406578064,
            -0.38948574662208557,
            -0.35617685317993164,
        ],
        [
            -0.6575101613998413,
            -0.08339593559503555,
            0.04298921301960945,
            0.22885724902153015,
            -0.38743823766708374,
            -0.35794293880462646,
        ],
    ]
)


def _graph(length: int, seed: int = 0, k: int = 8) -> dict:
    return backbone_graph(random_backbone(length, seed), torch.ones(length, 4, dtype=torch.bool), k_neighbors=k)


@pytest.fixture(scope="module")
def encoder() -> StructureEncoder:
    torch.manual_seed(0)
    cfg = StructureEncoderConfig(node_hidden=(24, 6), edge_hidden=(12, 2), num_layers=2, k_neighbors=8)
    return StructureEncoder(cfg).eval()


@pytest.mark.parametrize("vector_gate", [True, False])
@pytest.mark.parametrize("in_dims,out_dims", [((5, 4), (7, 3)), ((5, 0), (7, 3)), ((5, 4), (7, 0))])
def test_gvp_is_equivariant(vector_gate, in_dims, out_dims):
    torch.manual_seed(0)
    gvp = GVP(in_dims, out_dims, vector_gate=vector_gate)
    s, v = torch.randn(10, in_dims[0]), torch.randn(10, in_dims[1], 3)
    rot = random_rotation(1)
    s1, v1 = gvp((s, v))
    s2, v2 = gvp((s, v @ rot.T))
    assert s1.shape == (10, out_dims[0]) and v1.shape == (10, out_dims[1], 3)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)
    torch.testing.assert_close(v1 @ rot.T, v2, atol=1e-5, rtol=0)


def test_tuple_layer_norm_is_equivariant():
    norm = _TupleLayerNorm((5, 4))
    s, v = torch.randn(6, 5), torch.randn(6, 4, 3)
    rot = random_rotation(2)
    torch.testing.assert_close(norm((s, v))[1] @ rot.T, norm((s, v @ rot.T))[1], atol=1e-5, rtol=0)


def test_output_shape(encoder):
    batch = collate_graphs([_graph(12), _graph(7, seed=1)])
    with torch.no_grad():
        out = encoder(batch)
        nodes = encoder.node_representations(batch)
    assert out.shape == (2, encoder.output_dim) == (2, 24)
    assert nodes.shape == (19, 24)


def test_rotation_translation_invariance(encoder):
    coords, mask = random_backbone(25, seed=3), torch.ones(25, 4, dtype=torch.bool)
    moved = coords @ random_rotation(4).T + torch.tensor([-7.0, 3.0, 12.0])
    with torch.no_grad():
        a = encoder(collate_graphs([backbone_graph(coords, mask, k_neighbors=8)]))
        b = encoder(collate_graphs([backbone_graph(moved, mask, k_neighbors=8)]))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_empty_graphs_give_zeros_and_leave_others_alone(encoder):
    g = _graph(10, seed=5)
    empty = backbone_graph(random_backbone(3), torch.zeros(3, 4, dtype=torch.bool))
    with torch.no_grad():
        alone = encoder(collate_graphs([g]))
        mixed = encoder(collate_graphs([None, g, empty]))
        nothing = encoder(collate_graphs([None], edge_dim=32))
    assert mixed[0].abs().sum() == 0 and mixed[2].abs().sum() == 0
    torch.testing.assert_close(mixed[1], alone[0], atol=1e-5, rtol=0)
    assert nothing.shape == (1, 24) and nothing.abs().sum() == 0


def test_batch_composition_invariance(encoder):
    graphs = [_graph(9, seed=6), _graph(1, seed=7), _graph(16, seed=8), _graph(2, seed=9)]
    with torch.no_grad():
        together = encoder(collate_graphs(graphs))
        alone = torch.cat([encoder(collate_graphs([g])) for g in graphs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_gradients_flow_and_are_finite():
    torch.manual_seed(0)
    enc = StructureEncoder(StructureEncoderConfig(node_hidden=(16, 4), edge_hidden=(8, 1), num_layers=1))
    enc.train()
    batch = collate_graphs(
        [
            _graph(6),
            None,
            _graph(1, seed=2),
            backbone_graph(torch.zeros(3, 4, 3), torch.ones(3, 4, dtype=torch.bool)),
        ]
    )
    enc(batch).square().sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert enc.embed_nodes[1].ws.weight.grad.abs().sum() > 0


def _reference_conv(conv: GVPConv, x, edge_index, edge_attr):
    """GVPConv by the per-edge formula: message GVPs on [j, edge, i], then the mean over incoming edges."""
    (s, v), (edge_s, edge_v) = x, edge_attr
    src, dst = edge_index
    ms, mv = conv.message_gvps(
        (torch.cat([s[src], edge_s, s[dst]], dim=-1), torch.cat([v[src], edge_v, v[dst]], dim=-2))
    )  # (E, S), (E, V, 3)
    count = torch.zeros(s.shape[0]).index_add_(0, dst, torch.ones(dst.shape[0])).clamp_min(1)  # (N,)
    out_s = torch.zeros(s.shape[0], ms.shape[1]).index_add_(0, dst, ms) / count[:, None]
    out_v = torch.zeros(s.shape[0], *mv.shape[1:]).index_add_(0, dst, mv) / count[:, None, None]
    return out_s, out_v


@pytest.mark.parametrize(
    "node_dims,edge_dims,vector_gate",
    [
        ((100, 16), (32, 1), True),  # the recipes' sizes
        ((24, 6), (12, 2), True),
        ((24, 6), (12, 1), False),
        ((8, 0), (5, 1), True),
        ((8, 0), (5, 0), True),
        ((8, 3), (5, 0), False),
    ],
)
def test_conv_equals_per_edge_formula(node_dims, edge_dims, vector_gate):
    """The node/edge split of the first message GVP gives the per-edge formula's outputs and gradients."""
    torch.manual_seed(0)
    conv = GVPConv(node_dims, edge_dims, vector_gate=vector_gate)
    num_nodes, num_edges = 30, 200
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(0, num_nodes - 2, (num_edges,), generator=gen)  # the last two nodes receive nothing
    dst = torch.randint(0, num_nodes - 2, (num_edges,), generator=gen)
    edge_index = torch.stack([src, dst])
    inputs = [
        torch.randn(num_nodes, node_dims[0], generator=gen),
        torch.randn(num_nodes, node_dims[1], 3, generator=gen),
        torch.randn(num_edges, edge_dims[0], generator=gen),
        torch.randn(num_edges, edge_dims[1], 3, generator=gen),
    ]
    results = []
    per_edge = lambda x, ei, ea: conv._per_edge(x, ei[0], ei[1], ea)  # noqa: E731  (the ZeRO-3 path)
    for fn in (conv, lambda *a: _reference_conv(conv, *a), per_edge):
        leaves = [t.clone().requires_grad_() for t in inputs]
        conv.zero_grad(set_to_none=True)
        out_s, out_v = fn((leaves[0], leaves[1]), edge_index, (leaves[2], leaves[3]))
        weights = (
            torch.randn(out_s.shape, generator=torch.Generator().manual_seed(2)),
            torch.randn(out_v.shape, generator=torch.Generator().manual_seed(3)),
        )
        ((out_s * weights[0]).sum() + (out_v * weights[1]).sum()).backward()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        grads += [p.grad if p.grad is not None else torch.zeros_like(p) for p in conv.parameters()]
        results.append((out_s.detach(), out_v.detach(), grads))
    (s1, v1, g1), (s2, v2, g2), (s3, v3, g3) = results
    assert s1.abs().sum() > 0 and (node_dims[1] == 0 or v1.abs().sum() > 0)
    assert s1[-2:].abs().sum() == 0  # nodes without incoming edges get zeros
    for s_, v_, g_ in ((s1, v1, g1), (s3, v3, g3)):  # the split path and the per-edge (ZeRO-3) path
        torch.testing.assert_close(s_, s2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_, v2, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_, g2):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_encoder_matches_saved_outputs_of_the_unsplit_implementation():
    """Pooled embeddings of a fixed model on fixed backbones, as the per-edge implementation gave them."""
    torch.manual_seed(0)
    cfg = StructureEncoderConfig(node_hidden=(24, 6), edge_hidden=(12, 2), num_layers=2, k_neighbors=8)
    enc = StructureEncoder(cfg).eval()
    batch = collate_graphs([_graph(20, seed=11), _graph(9, seed=12)])
    with torch.no_grad():
        out = enc(batch)
    torch.testing.assert_close(out[:, :6], SAVED_POOLED, atol=2e-5, rtol=1e-5)
