"""Set-up: the SVD cache of every adapted layer, then PiSSA's init written into the model.

:func:`build_states` computes and allocates everything (SVD, state stacks, the factors of the
initial pairs, the half-precision residuals, one fp32 scratch buffer per device) without writing
into the model; :func:`write_pissa_init_` then makes the only writes: ``B``, ``A`` and the frozen
weight's residual ``W0 - s*B0@A0``, so that ``W + s*B@A == W0`` (to the weight's rounding; with
``half_fusion="residual"`` the int8 residual keeps 8 more bits of it). With ``fusion="virtual"``
the weight is not written: the residual is the first rows of the layer's side path
(:mod:`srlora.virtual`), whose forward hook is attached last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from .config import SRLoRAConfig
from .factors import pissa_factors, split_residual_
from .layers import AdaptedLayer
from .module_state import ModuleState, StateStack
from .svd import top_singular_directions_many
from .virtual import VirtualSide

Directions = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U, S, Vh
SVDFn = Callable[[list[AdaptedLayer], list[int]], list[Directions]]


def store_device(config: SRLoRAConfig, L: AdaptedLayer) -> torch.device:
    """Where a layer's SVD cache and ledger live (``offload_device``, else beside the weight)."""
    off = config.offload_device
    return torch.device(off) if off is not None else L.base_weight.device


def directions_per_layer(config: SRLoRAConfig, layers: list[AdaptedLayer]) -> list[int]:
    """K per layer: ``min(r_target, m, n)`` for a switching method, ``min(r, m, n)`` for
    PiSSA; ``r_target`` slots when no SVD is read (``insertion="lora"``: no direction bound)."""
    if not config.svd_init:
        return [max(config.r_target, L.r) for L in layers]
    return [min(config.r_target if config.switches else L.r, *L.shape) for L in layers]


def zero_directions(layers: list[AdaptedLayer], ks: list[int]) -> list:
    """A cache of zero directions (``S = 0``) per layer, for an insertion that reads none."""
    return [
        (torch.zeros(L.shape[0], k), torch.zeros(k), torch.zeros(k, L.shape[1]))
        for L, k in zip(layers, ks)
    ]


class Weights(Sequence):
    """The layers' ``W()`` on demand: a bitsandbytes base is dequantized only while the SVD
    reads it, not all of a model's layers at once."""

    def __init__(self, layers: list[AdaptedLayer]):
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.layers[i].W()


@torch.no_grad()
def build_states(
    config: SRLoRAConfig, layers: list[AdaptedLayer], svd_fn: Optional[SVDFn] = None
) -> tuple[list[ModuleState], dict]:
    """The SVD of every layer's weight in its cache, the initial pairs' factors and every buffer
    the init will need. Writes nothing into the model. Returns the states and the init plan."""
    ks = directions_per_layer(config, layers)
    if not config.svd_init:
        results = zero_directions(layers, ks)
    elif svd_fn is None:
        results = top_singular_directions_many(
            Weights(layers),
            ks,
            config.svd_method,
            config.svd_oversample,
            config.svd_niter,
            config.svd_seed,
            names=[L.name for L in layers],
        )
    else:
        results = svd_fn(layers, ks)
    # modules of one shape, K, rank and store keep their cache and ledger in one stack
    keys = [(L.shape, k, L.r, store_device(config, L)) for L, k in zip(layers, ks)]
    stacks = {key: StateStack(G, *key) for key, G in Counter(keys).items()}
    virtual = config.fusion == "virtual"
    states, factors, scratch = [], [], {}
    for L, k, key, (U, S, Vh) in zip(layers, ks, keys, results):
        st = ModuleState(L, k, stacks[key])
        st.U.copy_(U)
        st.S.copy_(S)
        st.Vh.copy_(Vh)
        dev = L.base_weight.device
        half = L.dtype != torch.float32 and config.switches and not virtual
        if half and config.half_fusion == "original":
            st.keep_original(L.W())
        if half and config.half_fusion == "residual":
            st.residual = torch.empty(L.shape, dtype=torch.int8, device=dev)
        r0 = min(L.r, k)
        B0, A0 = pissa_factors(U[:, :r0], S[:r0], Vh[:r0], L.scaling)
        if not config.svd_init:  # PEFT's LoRA init stays: B zero, A random, W untouched
            B0, A0 = torch.zeros_like(B0), L.A()[:r0].detach().float().clone()
        factors.append((r0, B0.to(dev), A0.to(dev)))
        if virtual:
            st.side = VirtualSide(L, k, r0)
        else:
            scratch[dev] = max(scratch.get(dev, 0), L.shape[0] * L.shape[1])
        states.append(st)
    buffers = {dev: torch.empty(n, dtype=torch.float32, device=dev) for dev, n in scratch.items()}
    return states, {"factors": factors, "buffers": buffers}


@torch.no_grad()
def write_pissa_init_(states: list[ModuleState], plan: dict) -> None:
    """Write the initial pairs into ``B``, ``A`` and subtract them from the frozen weight: the
    only writes of the set-up (in place, into buffers :func:`build_states` allocated)."""
    for st, (r0, B0, A0) in zip(states, plan["factors"]):
        L = st.layer
        L.B().zero_()
        L.A().zero_()
        L.B()[:, :r0] = B0.to(L.B().dtype)
        L.A()[:r0] = A0.to(L.A().dtype)
        st.p = r0
        if st.side is not None:  # fusion="virtual": W stays W0
            st.side.write_init(B0, A0)
            continue
        W = L.W()
        W_res = plan["buffers"][W.device][: W.numel()].view(W.shape)
        torch.matmul(B0, A0, out=W_res)
        W_res.mul_(-L.scaling).add_(W)  # W0 - s*(B0@A0), in fp32
        if st.residual is not None:
            split_residual_(W_res, W, st.residual)
        else:
            W.copy_(W_res)
    for st in states:  # last: nothing above can fail with a hook half attached
        if st.side is not None:
            st.side.attach(st.layer.layer)
