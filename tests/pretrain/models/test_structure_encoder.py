import pytest
import torch

from pretrain.data.featurize import backbone_graph, collate_graphs
from pretrain.models.structure_encoder import GVP, StructureEncoder, StructureEncoderConfig, _TupleLayerNorm
from tests.geometry import random_backbone, random_rotation


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
