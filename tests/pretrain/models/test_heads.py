import torch

from pretrain.models.heads import ProjectionHead


def test_shapes_and_layers():
    head = ProjectionHead(48, 16, hidden_dim=32, dropout=0.1)
    assert head(torch.randn(5, 48)).shape == (5, 16)
    assert head(torch.randn(2, 3, 48)).shape == (2, 3, 16)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 32), (32, 16)]
    assert any(isinstance(m, torch.nn.GELU) for m in head.modules())


def test_hidden_defaults_to_input_width_and_output_is_not_normalised():
    torch.manual_seed(0)
    head = ProjectionHead(8, 4)
    assert head.net[0].out_features == 8
    out = head(torch.randn(6, 8) * 10)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(6))


def test_eval_is_deterministic_and_gradients_flow():
    torch.manual_seed(0)
    head = ProjectionHead(8, 4, dropout=0.5).eval()
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(head(x), head(x))
    head.train()
    head(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in head.parameters())
