"""How a frozen weight takes a switch's change, and the exact low-rank change against W0.

A switch adds ``s*(B_low@A_low - B_new@A_new)`` (``= s*Bc@Ac``, :func:`factors.switch_factors`)
to the frozen weight, so ``W + s*B@A`` is unchanged. fp32 weights take it in place (one
``addmm_``). Half-precision weights follow ``SRLoRAConfig.half_fusion``:

* ``"residual"``: an int8 residual of the weight's last rounding lives beside it; the change is
  added to the joined ~16-bit-mantissa value and split again (one rounding, no host copy);
* ``"original"``: the weight is rebuilt from a stored copy of W0 and every fused and subtracted
  factor (one rounding from W0, exact);
* ``"inplace"``: the change is added and the sum rounded at every switch (the error grows).

With ``SRLoRAConfig.fusion="virtual"`` (``st.side`` set) the weight is not written at all: the
fused pairs and the new directions go into the layer's side-path factors (:mod:`srlora.virtual`).

Whichever the mode, ``W0 + s*Bd@Ad`` (:func:`delta_factors`) is the effective weight, exactly in
the factors' fp32: the ledger of fused pairs and the subtracted directions make the export exact.
"""

from __future__ import annotations

import torch

from .factors import join_residual, pissa_factors, split_residual_, switch_delta
from .module_state import ModuleState


def subtracted_factors(st: ModuleState, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA factors of directions ``0 .. p-1``: everything ever subtracted from W0."""
    return pissa_factors(
        st.fetch(st.U[:, : st.p], dev),
        st.fetch(st.S[: st.p], dev),
        st.fetch(st.Vh[: st.p], dev),
        st.layer.scaling,
    )


def rebuild_base(st: ModuleState) -> torch.Tensor:
    """``W0 - s*B_sub@A_sub + s*FB@FA`` in fp32, from the original weight: one rounding only."""
    L, s = st.layer, st.layer.scaling
    dev = L.W().device
    Bs, As = subtracted_factors(st, dev)
    W = st.fetch(st.original, dev).float() - s * (Bs @ As)
    if st.fused() > 0:
        W += s * (st.fetch(st.FB, dev) @ st.fetch(st.FA, dev))
    return W


def weight_mode(st: ModuleState) -> str:
    """How module ``st``'s frozen weight is held, the one dispatch of every fusion mode:
    "virtual" (W stays W0; the change lives in the side path), "original" (rebuilt from a copy
    of W0), "residual" (a 16-bit W and its int8 rounding residual) or "plain" (W itself: fp32
    in place, or a 16-bit W rounded at every switch, ``half_fusion="inplace"``)."""
    if st.side is not None:
        return "virtual"
    if st.original is not None:
        return "original"
    if st.residual is not None:
        return "residual"
    return "plain"


@torch.no_grad()
def frozen_weight(st: ModuleState) -> torch.Tensor:
    """The module's current frozen weight (everything but ``s*B@A``) in fp32, on its device."""
    mode, W = weight_mode(st), st.layer.W()
    if mode == "virtual":  # W is W0: the change is ``s*(FB@FA - B_sub@A_sub)``
        Bs, As = subtracted_factors(st, W.device)
        out = W.float() - st.layer.scaling * (Bs @ As)
        if st.fused() > 0:
            out += st.layer.scaling * (st.fetch(st.FB, W.device) @ st.fetch(st.FA, W.device))
        return out
    if mode == "original":
        return rebuild_base(st)
    if mode == "residual":
        return join_residual(W, st.residual)
    return W.float()


def fuse_into_weight(
    st: ModuleState,
    k: int,
    Bc: torch.Tensor,
    Ac: torch.Tensor,
    B_low: torch.Tensor,
    A_low: torch.Tensor,
    B_new: torch.Tensor,
    A_new: torch.Tensor,
) -> None:
    """Add ``s*(B_low@A_low - B_new@A_new)`` (``= s*Bc@Ac``) to one frozen weight; advance p by
    k (with ``half_fusion="original"`` the pairs go into the ledger first: the rebuild reads
    them)."""
    mode = weight_mode(st)
    if mode == "virtual":  # only the side path's factors are written
        f0 = st.fused()
        st.p += k
        st.side.write_switch(f0, B_low, A_low, B_new, A_new)
        return
    W, s = st.layer.W(), st.layer.scaling
    st.p += k
    if mode == "original":
        st.store_fused(B_low, A_low)
        W.copy_(rebuild_base(st).to(W.dtype))
    elif mode == "residual":
        split_residual_(join_residual(W, st.residual).addmm_(Bc, Ac, alpha=s), W, st.residual)
    elif W.dtype == torch.float32:
        W.addmm_(Bc, Ac, alpha=s)
    else:  # half_fusion="inplace": round at every switch
        W.copy_((W.float() + switch_delta(B_low, A_low, B_new, A_new, s)).to(W.dtype))


def delta_factors(st: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors (fp32) of the whole change of one module against its ORIGINAL weight.

    ``W_effective - W0 == s * Bd @ Ad`` with ``Bd = [B | FB | -B_sub]``, ``Ad = [A; FA; A_sub]``,
    rank ``r + (p - r) + p``.
    """
    L = st.layer
    B, A = L.B().float(), L.A().float()
    Bs, As = subtracted_factors(st, B.device)
    return (
        torch.cat([B, st.FB.to(B.device), -Bs], dim=1),
        torch.cat([A, st.FA.to(B.device), As], dim=0),
    )
