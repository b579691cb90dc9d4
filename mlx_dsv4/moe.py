"""Mixture of experts: sqrt-softplus routing, hash routing, clamped SwiGLU."""

import mlx.core as mx
import mlx.nn as nn
from .layers import GatheredLinear

from .config import ModelArgs
from .spec import is_hash_layer


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


class SharedExpert(nn.Module):
    def __init__(self, dim: int, hidden: int, limit: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.limit = limit

    def __call__(self, x):
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


class RoutedExperts(nn.Module):
    """Stacked expert weights [E, out, in] run through gathered matmuls."""

    def __init__(self, dim: int, hidden: int, n_experts: int, limit: float):
        super().__init__()
        self.w1 = GatheredLinear(dim, hidden, n_experts, bias=False)
        self.w2 = GatheredLinear(hidden, dim, n_experts, bias=False)
        self.w3 = GatheredLinear(dim, hidden, n_experts, bias=False)
        self.limit = limit

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> [..., k, D]."""
        lead = indices.shape
        x = mx.expand_dims(x, (-2, -3))
        # Sorting tokens by expert makes the gathered matmuls read each expert once.
        do_sort = indices.size >= 64
        idx = indices
        if do_sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            x = x.flatten(0, -3)[order // lead[-1]]
            idx = flat[order]
        h = clamped_swiglu(self.w1(x, idx, sorted_indices=do_sort), self.w3(x, idx, sorted_indices=do_sort), self.limit)
        y = self.w2(h, idx, sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y[inv_order], 0, lead)
        return y.squeeze(-2)


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.scoring_func = args.scoring_func
        self.scale = args.routed_scaling_factor
        self.hashed = hashed
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if hashed:
            self.tid2eid = mx.zeros((args.vocab_size, self.top_k), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array, tokens: mx.array):
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if self.scoring_func == "sqrtsoftplus":
            scores = mx.sqrt(mx.logaddexp(logits, 0.0))
        else:
            scores = mx.sigmoid(logits)
        if self.hashed:
            indices = self.tid2eid[tokens].astype(mx.int32)
        else:
            biased = scores + self.bias.astype(mx.float32)
            # Routing is a choice, not a function to differentiate: gradients reach the scores only.
            indices = mx.stop_gradient(mx.argpartition(-biased, self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(scores, indices, axis=-1)
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.scale


class MoE(nn.Module):
    # Called with (layer_id, expert indices) on every forward pass when set on a layer
    # (mlx_dsv4.metrics.RoutingCounter); None, the default, adds nothing to the pass.
    routing_counter = None

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(args, hashed=is_hash_layer(args, layer_id))
        limit = args.swiglu_limit
        self.experts = RoutedExperts(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts, limit)
        if args.n_shared_experts:
            self.shared_experts = SharedExpert(args.hidden_size, args.moe_intermediate_size, limit)

    def __call__(self, x: mx.array, tokens: mx.array) -> mx.array:
        indices, weights = self.gate(x, tokens)
        if self.routing_counter is not None:
            self.routing_counter(self.layer_id, indices)
        y = self.experts(x, indices)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
