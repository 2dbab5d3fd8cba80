"""Virtual fusion (``SRLoRAConfig(fusion="virtual")``): the frozen base weight is never written.

With ``fusion="weight"`` the frozen weight holds ``W0 - s*B_sub@A_sub + s*FB@FA`` (the PiSSA
residual, the subtracted directions and the fused pairs). With ``fusion="virtual"`` it keeps
``W0`` bitwise, from set-up on, and that same change is a frozen low-rank side path added to the
output of PEFT's LoRA layer by a forward hook::

    y = base(x) + lora(dropout(x)) + s * (x @ At[:R].T) @ Bt[:R]

with ``Bt`` rows ``[-B_sub(0..r0-1); FB_0; -B_sub(r0); FB_1; -B_sub(r0+1); ...]`` and ``At`` rows
``[A_sub(0..r0-1); FA_0; A_sub(r0); FA_1; A_sub(r0+1); ...]``: the directions subtracted at
set-up, then each fused pair next to the direction subtracted with it. ``R = 2p - r`` grows by
``2k`` per switch (at most ``2K - r``), and a row's position depends only on its direction or
pair index, so the buffers can be rebuilt from the ledger, the SVD cache and ``p`` (resume)
bitwise as the switches wrote them. The side path sees the un-dropped input (it is part of the
frozen base), and runs also when the adapter is disabled or merged, as the residual weight does.
Every layer SRLoRA adapts is served: ``nn.Linear``, transformers' ``Conv1D`` (``x`` is ``... x n``
there too) and 1x1 ``nn.Conv2d`` (through the base conv's own ``_conv_forward``: its stride,
padding, padding mode and dilation).

The buffers are allocated once at set-up (``2K - r`` rows) on the weight's device and in the
weight's dtype, so the side path computes in the dtype the base layer computes in; the exact
fp32 values stay in the ledger and the SVD cache (export and resume read those).

A bitsandbytes 4-bit or 8-bit base (the QLoRA set-up) works the same way: the SVD reads the
dequantized weight ``deq(Wq)``, the quantized weight stays as it is, and the side path holds
PiSSA's residual, so right after set-up the model computes ``deq(Wq)`` exactly as the quantized
base did (its buffers: the dtype the 4-bit weight was quantized from; float32 for 8-bit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .factors import pissa_factors
from .layers import AdaptedLayer

if TYPE_CHECKING:
    from .module_state import ModuleState


class VirtualSide:
    """The side path of one adapted layer: the buffers ``Bt`` ((2K - r0) x m) and ``At``
    ((2K - r0) x n), the rank in use ``R`` and the forward hook on PEFT's LoRA layer."""

    def __init__(self, L: AdaptedLayer, K: int, r0: int):
        (m, n), cap = L.shape, r0 + 2 * (K - r0)
        dtype, device = L.dtype, L.base_weight.device  # a bnb base: the dequantized dtype
        self.Bt = torch.empty(cap, m, dtype=dtype, device=device)
        self.At = torch.empty(cap, n, dtype=dtype, device=device)
        self.r0, self.R = r0, 0
        self.scaling = L.scaling
        base = L.layer.get_base_layer()
        self.conv: Optional[nn.Conv2d] = base if isinstance(base, nn.Conv2d) else None
        self.handle = None

    # ------------------------------------------------------------------ writes
    def write_init(self, B0: torch.Tensor, A0: torch.Tensor) -> None:
        """The directions subtracted at set-up (``B0`` m x r0, ``A0`` r0 x n)."""
        r0 = B0.shape[1]
        self.Bt[:r0] = B0.T.neg()
        self.At[:r0] = A0
        self.R = r0

    def write_switch(
        self,
        f0: int,
        B_low: torch.Tensor,
        A_low: torch.Tensor,
        B_new: torch.Tensor,
        A_new: torch.Tensor,
    ) -> None:
        """One switch's k fused pairs (ledger positions ``f0 .. f0+k-1``) and the k directions
        subtracted with them: rows ``r0 + 2*f0 .. r0 + 2*(f0+k) - 1``, interleaved."""
        k, pos = B_low.shape[1], self.r0 + 2 * f0
        b = self.Bt[pos : pos + 2 * k].view(k, 2, -1)
        a = self.At[pos : pos + 2 * k].view(k, 2, -1)
        b[:, 0], b[:, 1] = B_low.T, B_new.T.neg()
        a[:, 0], a[:, 1] = A_low, A_new
        self.R = pos + 2 * k

    @torch.no_grad()
    def rebuild(self, st: "ModuleState") -> None:
        """Rewrite the rows in use from ``st``'s SVD cache, ledger and pointer (after a load)."""
        dev, f, p = self.Bt.device, st.fused(), st.p
        Bs, As = pissa_factors(
            st.fetch(st.U[:, :p], dev),
            st.fetch(st.S[:p], dev),
            st.fetch(st.Vh[:p], dev),
            self.scaling,
        )
        self.write_init(Bs[:, : self.r0], As[: self.r0])
        if f > 0:
            self.write_switch(
                0, st.fetch(st.FB, dev), st.fetch(st.FA, dev), Bs[:, self.r0 :], As[self.r0 :]
            )

    # ------------------------------------------------------------------ forward
    def attach(self, layer: nn.Module) -> None:
        self.handle = layer.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor):
        """``out + s * side(x)`` for PEFT's LoRA layer ``module`` (x: its first argument)."""
        R = self.R
        if R == 0:
            return out
        x = args[0] if args else kwargs["x"]
        if self.At.device != x.device:  # the model was moved after wrap: follow it
            self.At, self.Bt = self.At.to(x.device), self.Bt.to(x.device)
        At, Bt = self.At[:R], self.Bt[:R]
        x = x.to(At.dtype)
        if self.conv is not None:  # 1x1: the base's stride/padding/dilation, then channels
            z = self.conv._conv_forward(x, At.view(R, -1, 1, 1), None)
            y = torch.einsum("brhw,rm->bmhw", z, Bt)
        else:
            y = (x @ At.T) @ Bt
        return torch.add(out, y.to(out.dtype), alpha=self.scaling)
