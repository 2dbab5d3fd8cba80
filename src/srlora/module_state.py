"""What the controller keeps for one adapted layer: the SVD cache, the pointer, the ledger of
fused pairs, the half-precision state (int8 residual or original copy) and, with
``fusion="virtual"``, the side path (:mod:`srlora.virtual`).

The cache and ledger of the modules that share a shape, rank and store live in one
:class:`StateStack`; each :class:`ModuleState` holds views of its row of it, so a switch reads
the next directions of a whole stack with one slice and writes its ledger with another.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layers import AdaptedLayer


class StateStack:
    """SVD caches and ledgers of ``G`` modules with one ``m x n`` shape, one rank ``r`` and one
    ``K``, stacked on the store device (``G x m x K``, ``G x K``, ``G x K x n``, and the ledger
    ``G x (K-r) x m`` for the fused B columns as rows, ``G x (K-r) x n`` for the fused A rows).

    Nothing fills the ledger up front (1.2 GiB of zeros for a 1B model at r_target 512): it is
    written front to back, one switch's rows at a time, only its written prefix is read, and in
    host memory its pages are touched as pairs are fused.
    """

    def __init__(self, G: int, shape: tuple[int, int], K: int, r: int, store: torch.device):
        m, n = shape
        self.shape, self.K, self.r = (m, n), K, r
        self.U = torch.empty(G, m, K, device=store)
        self.S = torch.empty(G, K, device=store)
        self.Vh = torch.empty(G, K, n, device=store)
        self.FBt = torch.empty(G, max(K - r, 0), m, device=store)
        self.FA = torch.empty(G, max(K - r, 0), n, device=store)
        self.members: list[ModuleState] = []

    def resize(self, K: int, keep: int) -> None:
        """Grow the stack to ``K`` directions (``exhaustion="refresh"``), keeping directions
        ``0 .. keep-1`` and the ledger's first ``keep - r`` rows (everything in use at pointer
        ``keep``); the members' views are pointed at the new storage."""
        (m, n), G, store = self.shape, len(self.members), self.U.device
        f = max(keep - self.r, 0)
        U, S, Vh = (
            torch.empty(G, m, K, device=store),
            torch.empty(G, K, device=store),
            torch.empty(G, K, n, device=store),
        )
        FBt = torch.empty(G, max(K - self.r, 0), m, device=store)
        FA = torch.empty(G, max(K - self.r, 0), n, device=store)
        U[:, :, :keep], S[:, :keep], Vh[:, :keep] = (
            self.U[:, :, :keep],
            self.S[:, :keep],
            self.Vh[:, :keep],
        )
        FBt[:, :f], FA[:, :f] = self.FBt[:, :f], self.FA[:, :f]
        self.U, self.S, self.Vh, self.FBt, self.FA, self.K = U, S, Vh, FBt, FA, K
        for g, st in enumerate(self.members):
            st.K = K
            st.U, st.S, st.Vh = U[g], S[g], Vh[g]
            st._FBt, st._FA = FBt[g], FA[g]

    def is_whole(self, sts: Sequence["ModuleState"]) -> bool:
        """``sts`` are all members, in order, at one pointer: one slice of the stack serves them."""
        return len(sts) == len(self.members) and all(
            a is b and a.p == sts[0].p for a, b in zip(sts, self.members)
        )


class ModuleState:
    """Everything the controller keeps for one adapted layer (tensors and ints)."""

    def __init__(self, layer: AdaptedLayer, K: int, stack: StateStack):
        self.layer = layer
        self.K = K  # directions available: min(r_target, m, n), more after a refresh
        self.K0 = K  # directions of the ORIGINAL weight's SVD (the first block)
        self.p = 0  # directions consumed
        self.blocks: list[int] = []  # exhaustion="refresh": where each refreshed block starts
        self.stack = stack
        g = len(stack.members)
        stack.members.append(self)
        self.U, self.S, self.Vh = stack.U[g], stack.S[g], stack.Vh[g]
        self._FBt, self._FA = stack.FBt[g], stack.FA[g]  # the ledger, written front to back
        self.original: Optional[torch.Tensor] = None  # original W (m x n, its dtype) or None
        self.residual: Optional[torch.Tensor] = None  # int8 rounding residual of W, or None
        self.side = None  # fusion="virtual": the layer's srlora.virtual.VirtualSide, else None

    def keep_original(self, W: torch.Tensor) -> None:
        """Copy ``W`` to the store; pinned when the store is host memory and W is on CUDA (every
        switch copies it back whole; pinning costs about a second per GB, so nothing else is)."""
        pin = self.U.device.type == "cpu" and W.device.type == "cuda"
        self.original = torch.empty(W.shape, dtype=W.dtype, device=self.U.device, pin_memory=pin)
        self.original.copy_(W.detach())

    def fused(self, p: Optional[int] = None) -> int:
        """Pairs in the ledger at pointer ``p`` (default: now): ``p - r``, at least 0."""
        return max((self.p if p is None else p) - self.layer.r, 0)

    @property
    def FB(self) -> torch.Tensor:
        """The fused B columns, ``m x fused()`` (a view of the written ledger)."""
        return self._FBt[: self.fused()].T

    @property
    def FA(self) -> torch.Tensor:
        """The fused A rows, ``fused() x n`` (a view of the written ledger)."""
        return self._FA[: self.fused()]

    def state_shapes(self, p: int, K: Optional[int] = None) -> dict[str, tuple]:
        """Shapes of this module's ``state_dict`` tensors at pointer ``p`` (and ``K`` cached
        directions, default: now)."""
        (m, n), f, K = self.layer.shape, self.fused(p), self.K if K is None else K
        return {"U": (m, K), "S": (K,), "Vh": (K, n), "FB": (m, f), "FA": (f, n)}

    def store_fused(self, B_low: torch.Tensor, A_low: torch.Tensor) -> None:
        """Write the pairs fused by the switch that just advanced ``p`` into the ledger."""
        k = B_low.shape[1]
        f0 = self.fused() - k
        self._FBt[f0 : f0 + k] = B_low.T.to(self._FBt.device)
        self._FA[f0 : f0 + k] = A_low.to(self._FA.device)

    def load(self, m: dict) -> None:
        """Write a checked ``state_dict`` entry of this module (its shapes match ``p``)."""
        for key in ("U", "S", "Vh"):
            getattr(self, key).copy_(m[key])
        self.p = int(m["p"])
        self.blocks = [int(b) for b in m.get("blocks", [])]
        f = self.fused()
        self._FBt[:f].copy_(m["FB"].T)
        self._FA[:f].copy_(m["FA"])
        if self.original is not None and "original" in m:
            self.original.copy_(m["original"])
        if self.residual is not None and "residual" in m:
            self.residual.copy_(m["residual"])
        if self.side is not None:  # derived state: rebuilt from the cache, ledger and p
            self.side.rebuild(self)

    @staticmethod
    def fetch(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """``t`` (a slice of this module's stored state) on ``dev``; async from pinned memory."""
        return t.to(dev, non_blocking=t.device.type == "cpu" and t.is_pinned())


def next_directions(
    sts: Sequence[ModuleState], k: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Directions ``p .. p+k-1`` of each module of ``sts`` (one shape, one store), stacked on
    ``dev``: ``G x m x k``, ``G x k``, ``G x k x n``. One slice of their stack when ``sts`` is
    the whole stack; otherwise gathered module by module (same values). Always copies: the
    caller may write into the result, never into the cache."""
    stack, p = sts[0].stack, sts[0].p
    if stack.is_whole(sts):
        parts = (stack.U[:, :, p : p + k], stack.S[:, p : p + k], stack.Vh[:, p : p + k])
    else:
        parts = (
            torch.stack([st.U[:, st.p : st.p + k] for st in sts]),
            torch.stack([st.S[st.p : st.p + k] for st in sts]),
            torch.stack([st.Vh[st.p : st.p + k] for st in sts]),
        )
    return tuple(t.to(dev, copy=True) for t in parts)  # type: ignore[return-value]


def write_ledger(sts: Sequence[ModuleState], B_low: torch.Tensor, A_low: torch.Tensor) -> None:
    """Store the pairs just fused by each module of ``sts`` (``p`` already advanced; ``B_low``
    ``G x m x k``, ``A_low`` ``G x k x n``, on the store device): one write per factor when
    ``sts`` is the whole stack, else module by module (same values)."""
    stack, k = sts[0].stack, B_low.shape[2]
    if stack.is_whole(sts):
        f0 = sts[0].fused() - k
        stack.FBt[:, f0 : f0 + k] = B_low.transpose(1, 2)
        stack.FA[:, f0 : f0 + k] = A_low
    else:
        for st, b, a in zip(sts, B_low, A_low):
            st.store_fused(b, a)
