"""GVP-GNN structure encoder (Jing et al., ICLR 2021, with vector gating from Jing et al., 2021).

Every hidden state is a pair ``(s, v)`` of scalar channels ``s`` (N, S) and vector channels
``v`` (N, V, 3). Scalars only ever see vectors through their norms and vectors are only mixed
linearly across channels and scaled by per-channel gates, so ``s`` is invariant and ``v``
equivariant under rotations of the input coordinates; the pooled scalar embedding is therefore
invariant to rotation and translation of the structure.

Messages are averaged over each node's incoming edges with torch-geometric's ``MeanAggregation``
(what ``MessagePassing(aggr="mean")`` runs); the graphs come from
:func:`pretrain.data.featurize.collate_graphs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.errors import ConfigError
from pretrain.models.activation_checkpointing import is_layer_checkpointed, set_layer_checkpointing
from pretrain.models.graph_format import EDGE_V_DIM, NODE_S_DIM, NODE_V_DIM, edge_s_dim

Dims = tuple[int, int]  # (scalar channels, vector channels)
ScalarVector = tuple[Tensor, Tensor]  # (s (N, S), v (N, V, 3))

_EPS = 1e-8


@dataclass
class StructureEncoderConfig:
    node_hidden: tuple[int, int] = (100, 16)  # hidden node channels (scalar, vector)
    edge_hidden: tuple[int, int] = (32, 1)  # hidden edge channels (scalar, vector)
    num_layers: int = 3  # GVPConv layers
    k_neighbors: int = 16  # k-NN graph degree used by the featuriser
    num_rbf: int = 16  # radial basis functions of edge distances (featuriser)
    num_positional: int = 16  # sinusoidal channels of sequence offsets (featuriser)
    drop_rate: float = 0.1  # dropout inside GVPConv layers (vector dropout drops whole channels)
    vector_gate: bool = True  # gate vector channels with learned scalar gates (Jing et al. 2021)

    def validate(self, where: str = "model.structure") -> None:
        """Checks of the subsection's values; raises ConfigError naming the field (``where`` + key).

        Vector channels may be 0 (a GVP then carries scalars only); every other size must be >= 1.
        """
        for name in ("node_hidden", "edge_hidden"):
            scalars, vectors = getattr(self, name)
            if scalars < 1 or vectors < 0:
                raise ConfigError(
                    f"{where}.{name}={list(getattr(self, name))}: expected [scalar channels >= 1, vector channels >= 0]"
                )
        for name in ("num_layers", "k_neighbors", "num_rbf"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)}: must be >= 1")
        if self.num_positional < 2 or self.num_positional % 2:
            raise ConfigError(
                f"{where}.num_positional={self.num_positional}: must be an even number >= 2 (cosine and sine pairs)"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"{where}.drop_rate={self.drop_rate}: expected a value in [0, 1)")


def _norm_no_nan(x: Tensor, dim: int = -1, keepdim: bool = False, sqrt: bool = True) -> Tensor:
    """L2 norm clamped away from zero so that its gradient stays finite."""
    out = torch.clamp(torch.sum(x * x, dim=dim, keepdim=keepdim), min=_EPS)
    return torch.sqrt(out) if sqrt else out


class GVP(nn.Module):
    """Geometric vector perceptron: (s, v) -> (s', v') with invariant s', equivariant v'.

    Args:
        in_dims: input (scalar, vector) channels.
        out_dims: output (scalar, vector) channels; vector channels may be 0.
        activations: (scalar, vector) nonlinearities, ``None`` for identity.
        vector_gate: gate output vectors with a sigmoid of a linear map of the output scalars
            instead of a nonlinearity of their own norms.

    Shapes:
        s (N, Si), v (N, Vi, 3) -> s (N, So), v (N, Vo, 3); with Vi == 0 pass ``v`` as (N, 0, 3).
    """

    def __init__(
        self,
        in_dims: Dims,
        out_dims: Dims,
        activations: tuple[Callable | None, Callable | None] = (F.relu, torch.sigmoid),
        vector_gate: bool = True,
    ):
        super().__init__()
        (self.si, self.vi), (self.so, self.vo) = in_dims, out_dims
        self.scalar_act, self.vector_act = activations
        self.vector_gate = vector_gate
        h_dim = max(self.vi, self.vo)
        self.wh = nn.Linear(self.vi, h_dim, bias=False) if self.vi else None
        self.ws = nn.Linear(self.si + (h_dim if self.vi else 0), self.so)
        self.wv = nn.Linear(h_dim, self.vo, bias=False) if self.vi and self.vo else None
        self.wsv = nn.Linear(self.so, self.vo) if self.vo and vector_gate else None

    def forward(self, x: ScalarVector) -> ScalarVector:
        s, v = x
        if self.wh is not None:
            vh = self.wh(v.transpose(-1, -2))  # (N, 3, H) linear across channels only
            s = self.ws(torch.cat([s, _norm_no_nan(vh, dim=-2)], dim=-1))  # (N, So)
        else:
            vh = None
            s = self.ws(s)
        return self.finish(s, vh)

    def finish(self, s: Tensor, vh: Tensor | None) -> ScalarVector:
        """Output vectors, gates and activations from the scalar pre-activation and hidden vectors.

        Shapes:
            s (N, So) = ``ws`` of [scalars, |vh|]; vh (N, 3, H) or None without input vectors
            -> s (N, So), v (N, Vo, 3)
        """
        if self.vo:
            if self.wv is not None:
                v = self.wv(vh).transpose(-1, -2)  # (N, Vo, 3)
            else:
                v = s.new_zeros(s.shape[0], self.vo, 3)
            if self.wsv is not None:
                gate = self.wsv(self.vector_act(s) if self.vector_act else s)  # (N, Vo)
                v = v * torch.sigmoid(gate).unsqueeze(-1)
            elif self.vector_act is not None:
                v = v * self.vector_act(_norm_no_nan(v, dim=-1, keepdim=True))
        else:
            v = s.new_zeros(s.shape[0], 0, 3)
        if self.scalar_act is not None:
            s = self.scalar_act(s)
        return s, v


class _TupleLayerNorm(nn.Module):
    """LayerNorm on scalars; vectors divided by the RMS of their channel norms."""

    def __init__(self, dims: Dims):
        super().__init__()
        self.vector_channels = dims[1]
        self.scalar_norm = nn.LayerNorm(dims[0])

    def forward(self, x: ScalarVector) -> ScalarVector:
        s, v = x
        if not self.vector_channels:
            return self.scalar_norm(s), v
        rms = torch.sqrt(torch.mean(_norm_no_nan(v, dim=-1, keepdim=True, sqrt=False), dim=-2, keepdim=True))
        return self.scalar_norm(s), v / rms  # rms (N, 1, 1)


class _TupleDropout(nn.Module):
    """Dropout on scalars; whole vector channels are dropped (an equivariant operation)."""

    def __init__(self, drop_rate: float):
        super().__init__()
        self.drop_rate = drop_rate
        self.scalar_dropout = nn.Dropout(drop_rate)

    def forward(self, x: ScalarVector) -> ScalarVector:
        s, v = x
        if not self.training or self.drop_rate == 0.0:
            return s, v
        keep = torch.bernoulli(torch.full(v.shape[:-1], 1.0 - self.drop_rate, device=v.device))
        return self.scalar_dropout(s), v * keep.unsqueeze(-1).to(v.dtype) / (1.0 - self.drop_rate)


def _merge(s: Tensor, v: Tensor) -> Tensor:
    """(N, S), (N, V, 3) -> (N, S + 3V): one tensor to gather and aggregate."""
    return torch.cat([s, v.reshape(v.shape[0], 3 * v.shape[1])], dim=-1)


def _split(x: Tensor, vector_channels: int) -> ScalarVector:
    """Inverse of :func:`_merge`."""
    num_s = x.shape[-1] - 3 * vector_channels
    return x[:, :num_s], x[:, num_s:].reshape(x.shape[0], vector_channels, 3)


class GVPConv(nn.Module):
    """Graph convolution whose messages are a 3-GVP stack of (s_j, edge, s_i) and (v_j, edge, v_i).

    Most of the work is per edge (E = kN), so two linear maps are moved to the nodes: the first
    message GVP's linear maps act on the concatenation [node j, edge, node i] and split into a
    node-level part (computed once per node, then gathered per edge) and an edge-level part; the
    last message GVP is affine in its scalars, so its ``ws`` is applied after the mean over incoming
    edges (:meth:`_mean_of_last`). With the recipes' sizes this removes about half of the per-edge
    multiply-adds. The result equals the per-edge formula, the mean over incoming edges of
    ``message_gvps(([s_j, edge_s, s_i], [v_j, edge_v, v_i]))``, within fp32 rounding (same
    parameters, so checkpoints are unchanged; tests/pretrain/models/test_structure_encoder.py checks it).

    Args:
        node_dims: node (scalar, vector) channels, same in and out.
        edge_dims: edge (scalar, vector) channels.
        vector_gate: see :class:`GVP`.

    Shapes:
        x: (s (N, S), v (N, V, 3)); edge_index (2, E); edge_attr: (s (E, Se), v (E, Ve, 3))
        -> mean of incoming messages, (s (N, S), v (N, V, 3)); zeros for nodes without edges.
    """

    def __init__(self, node_dims: Dims, edge_dims: Dims, vector_gate: bool = True):
        super().__init__()
        # Imported here, not at module level: torch_geometric's package __init__ also loads its
        # datasets and LLM modules (~2 s), which processes that only read the config (Ray reader
        # actors, configuration errors, finished runs) should not pay.
        from torch_geometric.nn.aggr import MeanAggregation

        self.aggregate = MeanAggregation()
        self.node_dims, self.edge_dims = node_dims, edge_dims
        (ns, nv), (es, ev) = node_dims, edge_dims
        in_dims = (2 * ns + es, 2 * nv + ev)
        self.message_gvps = nn.Sequential(
            GVP(in_dims, node_dims, vector_gate=vector_gate),
            GVP(node_dims, node_dims, vector_gate=vector_gate),
            GVP(node_dims, node_dims, activations=(None, None), vector_gate=vector_gate),
        )

    def forward(self, x: ScalarVector, edge_index: Tensor, edge_attr: ScalarVector) -> ScalarVector:
        src, dst = edge_index  # messages flow from node j = src to node i = dst
        if self._partitioned():
            return self._per_edge(x, src, dst, edge_attr)
        s, vh = self._first_linear(x, src, dst, edge_attr)  # (E, S), (E, 3, H) or None
        first, middle = self.message_gvps[0], self.message_gvps[1]
        return self._mean_of_last(middle(first.finish(s, vh)), dst, x[0].shape[0])

    def _partitioned(self) -> bool:
        """Whether ZeRO-3 partitions this layer's parameters (DeepSpeed marks them with ``ds_id``).

        The split path reads the message GVPs' weights outside those modules' own forward, which
        ZeRO-3 neither gathers for nor traces (its prefetcher fails with "tracing error"); under
        ZeRO-3 the layer therefore runs the per-edge formula, module calls only.
        """
        return hasattr(self.message_gvps[0].ws.weight, "ds_id")

    def _per_edge(self, x: ScalarVector, src: Tensor, dst: Tensor, edge_attr: ScalarVector) -> ScalarVector:
        """The mean over incoming edges of ``message_gvps(([s_j, edge_s, s_i], [v_j, edge_v, v_i]))``,
        one message per edge (the formula the split path equals within fp32 rounding).

        Shapes:
            as :meth:`forward`: (s (N, S), v (N, V, 3)) -> (s (N, S), v (N, V, 3)).
        """
        (s, v), (edge_s, edge_v) = x, edge_attr
        s_msg = torch.cat([s.index_select(0, src), edge_s, s.index_select(0, dst)], dim=-1)  # (E, 2S + Se)
        v_msg = torch.cat([v.index_select(0, src), edge_v, v.index_select(0, dst)], dim=-2)  # (E, 2V + Ve, 3)
        messages = _merge(*self.message_gvps((s_msg, v_msg)))  # (E, S + 3V)
        return _split(self.aggregate(messages, dst, dim_size=s.shape[0]), self.node_dims[1])

    def _mean_of_last(self, x: ScalarVector, dst: Tensor, num_nodes: int) -> ScalarVector:
        """Mean over each node's incoming edges of the last message GVP's outputs.

        That GVP has no activations, so its scalar output is affine in [s, |vh|]: the mean is taken
        of those inputs and ``ws`` applied per node, not per edge. The vector gates need the per-edge
        scalars only through ``wsv``, so they use the composed map ``wsv . ws`` (Vo rows, not So).

        Shapes:
            x (s (E, S), v (E, V, 3)), dst (E,) -> (s (N, S), v (N, Vo, 3)); zeros for nodes without edges
        """
        gvp = self.message_gvps[2]
        s, v = x
        if gvp.wh is not None:
            vh = gvp.wh(v.transpose(-1, -2))  # (E, 3, H)
            inputs = torch.cat([s, _norm_no_nan(vh, dim=-2)], dim=-1)  # (E, S + H)
        else:
            inputs = s
        if gvp.wv is not None:
            v = gvp.wv(vh).transpose(-1, -2)  # (E, Vo, 3)
            if gvp.wsv is not None:
                gate_w = gvp.wsv.weight @ gvp.ws.weight  # (Vo, S + H)
                gate_b = gvp.wsv.weight @ gvp.ws.bias + gvp.wsv.bias  # (Vo,)
                v = v * torch.sigmoid(F.linear(inputs, gate_w, gate_b)).unsqueeze(-1)
            mean = self.aggregate(_merge(inputs, v), dst, dim_size=num_nodes)  # (N, S + H + 3Vo)
            mean_inputs, out_v = _split(mean, gvp.vo)
        else:  # no vector output (or no vector input: a gate on zero vectors leaves zeros)
            mean_inputs = self.aggregate(inputs, dst, dim_size=num_nodes)  # (N, S + H)
            out_v = inputs.new_zeros(num_nodes, gvp.vo, 3)
        has_edges = torch.bincount(dst, minlength=num_nodes) > 0  # (N,)
        return gvp.ws(mean_inputs) * has_edges.unsqueeze(-1).to(mean_inputs.dtype), out_v

    def _first_linear(
        self, x: ScalarVector, src: Tensor, dst: Tensor, edge_attr: ScalarVector
    ) -> tuple[Tensor, Tensor | None]:
        """The first message GVP's ``ws`` / ``wh`` outputs per edge, split into node and edge parts.

        Shapes:
            x (s (N, S), v (N, V, 3)), src / dst (E,), edge_attr (s (E, Se), v (E, Ve, 3))
            -> s (E, So) pre-activation, vh (E, 3, H) (None when the GVP has no vector input)
        """
        (ns, nv), (es, ev) = self.node_dims, self.edge_dims
        gvp = self.message_gvps[0]
        s, v = x
        edge_s, edge_v = edge_attr
        ws = gvp.ws.weight  # (So, 2S + Se [+ H]) over [s_j, edge_s, s_i, |vh|]
        node_w = torch.cat([ws[:, :ns], ws[:, ns + es : 2 * ns + es]])  # (2 So, S): j rows, then i rows
        node_s = F.linear(s, node_w)  # (N, 2 So)
        so = gvp.so
        if gvp.wh is None:
            parts = node_s[:, :so].index_select(0, src) + node_s[:, so:].index_select(0, dst)  # (E, So)
            return parts + F.linear(edge_s, ws[:, ns : ns + es], gvp.ws.bias), None
        wh = gvp.wh.weight  # (H, 2V + Ve) over [v_j, edge_v, v_i]
        h = wh.shape[0]
        node_wh = torch.cat([wh[:, :nv], wh[:, nv + ev :]])  # (2H, V)
        node_v = F.linear(v.transpose(-1, -2), node_wh)  # (N, 3, 2H)
        node_j = torch.cat([node_s[:, :so], node_v[..., :h].reshape(-1, 3 * h)], dim=-1)  # (N, So + 3H)
        node_i = torch.cat([node_s[:, so:], node_v[..., h:].reshape(-1, 3 * h)], dim=-1)  # (N, So + 3H)
        # split, not two slices: a slice's backward fills a zero (E, So + 3H) tensor per slice.
        parts_s, parts_v = (node_j.index_select(0, src) + node_i.index_select(0, dst)).split([so, 3 * h], dim=-1)
        vh = parts_v.reshape(-1, 3, h) + F.linear(edge_v.transpose(-1, -2), wh[:, nv : nv + ev])  # (E, 3, H)
        edge_w = torch.cat([ws[:, ns : ns + es], ws[:, 2 * ns + es :]], dim=-1)  # (So, Se + H)
        s = parts_s + F.linear(torch.cat([edge_s, _norm_no_nan(vh, dim=-2)], dim=-1), edge_w, gvp.ws.bias)
        return s, vh  # (E, So), (E, 3, H)


class GVPConvLayer(nn.Module):
    """Residual GVPConv + residual 2-GVP feed-forward, each followed by tuple LayerNorm.

    Shapes:
        same as :class:`GVPConv`: node (s, v) in and out.
    """

    def __init__(self, node_dims: Dims, edge_dims: Dims, drop_rate: float = 0.1, vector_gate: bool = True):
        super().__init__()
        self.conv = GVPConv(node_dims, edge_dims, vector_gate=vector_gate)
        hidden = (4 * node_dims[0], 2 * node_dims[1])
        self.feed_forward = nn.Sequential(
            GVP(node_dims, hidden, vector_gate=vector_gate),
            GVP(hidden, node_dims, activations=(None, None), vector_gate=vector_gate),
        )
        self.norms = nn.ModuleList([_TupleLayerNorm(node_dims) for _ in range(2)])
        self.dropouts = nn.ModuleList([_TupleDropout(drop_rate) for _ in range(2)])

    def forward(self, x: ScalarVector, edge_index: Tensor, edge_attr: ScalarVector) -> ScalarVector:
        x = self._residual(x, self.conv(x, edge_index, edge_attr), 0)
        return self._residual(x, self.feed_forward(x), 1)

    def _residual(self, x: ScalarVector, dx: ScalarVector, idx: int) -> ScalarVector:
        ds, dv = self.dropouts[idx](dx)
        return self.norms[idx]((x[0] + ds, x[1] + dv))


class StructureEncoder(nn.Module):
    """GVP-GNN over backbone graphs, mean-pooled to one invariant vector per protein.

    Args:
        cfg: architecture; ``num_rbf`` / ``num_positional`` must match the featuriser's.

    Shapes:
        graph (from ``collate_graphs``) -> (B, D) with D = ``cfg.node_hidden[0]``.
    """

    def __init__(self, cfg: StructureEncoderConfig):
        super().__init__()
        self.cfg = cfg
        node_h, edge_h = tuple(cfg.node_hidden), tuple(cfg.edge_hidden)
        node_in = (NODE_S_DIM, NODE_V_DIM)
        edge_in = (edge_s_dim(cfg.num_rbf, cfg.num_positional), EDGE_V_DIM)
        gate = cfg.vector_gate
        self.embed_nodes = nn.Sequential(
            _TupleLayerNorm(node_in), GVP(node_in, node_h, activations=(None, None), vector_gate=gate)
        )
        self.embed_edges = nn.Sequential(
            _TupleLayerNorm(edge_in), GVP(edge_in, edge_h, activations=(None, None), vector_gate=gate)
        )
        self.layers = nn.ModuleList(
            [GVPConvLayer(node_h, edge_h, cfg.drop_rate, vector_gate=gate) for _ in range(cfg.num_layers)]
        )
        # Linear invariant read-out (scalars + vector norms); the projection head adds the
        # nonlinearity.
        self.readout = nn.Sequential(
            _TupleLayerNorm(node_h), GVP(node_h, (node_h[0], 0), activations=(None, None), vector_gate=gate)
        )
        self.output_dim = node_h[0]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each GVPConvLayer's activations in backward (``pretrain.models.activation_checkpointing``)."""
        set_layer_checkpointing(self.layers, enabled)

    @property
    def activation_checkpointing(self) -> bool:
        return len(self.layers) > 0 and all(is_layer_checkpointed(layer) for layer in self.layers)

    def node_representations(self, graph: dict[str, Tensor]) -> Tensor:
        """Per-residue invariant features.

        Shapes:
            graph["node_s"] (N, 6), ... -> (N, D)
        """
        dtype = self.readout[1].ws.weight.dtype  # follow the parameters (bf16 / fp16 engines)
        nodes = (graph["node_s"].to(dtype), graph["node_v"].to(dtype))
        edges = (graph["edge_s"].to(dtype), graph["edge_v"].to(dtype))
        x = self.embed_nodes(nodes)  # (N, S), (N, V, 3)
        e = self.embed_edges(edges)  # (E, Se), (E, Ve, 3)
        for layer in self.layers:
            x = layer(x, graph["edge_index"], e)
        return self.readout(x)[0]  # (N, D)

    def forward(self, graph: dict[str, Tensor]) -> Tensor:
        """Mean of each graph's node features; graphs without nodes give zeros.

        Shapes:
            graph with ``batch`` (N,) and ``num_graphs`` () -> (B, D)
        """
        h = self.node_representations(graph)  # (N, D)
        num_graphs = int(graph["num_graphs"])
        batch = graph["batch"]
        sums = h.new_zeros(num_graphs, h.shape[-1]).index_add_(0, batch, h)  # (B, D)
        counts = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(h.dtype)  # (B,)
        return sums / counts.unsqueeze(-1)
