"""What the controller keeps for one adapted layer: the SVD cache, the pointer, the ledger of
fused pairs and the half-precision state (int8 residual or original copy)."""
from __future__ import annotations

from typing import Optional

import torch

from .layers import AdaptedLayer


class ModuleState:
    """Everything the controller keeps for one adapted layer (tensors and ints)."""

    def __init__(self, layer: AdaptedLayer, K: int, store: torch.device):
        self.layer = layer
        self.K = K  # directions available: min(r_target, m, n)
        self.p = 0  # directions consumed
        m, n = layer.shape
        r = layer.r
        self.U = torch.empty(m, K, device=store)
        self.S = torch.empty(K, device=store)
        self.Vh = torch.empty(K, n, device=store)
        # the ledger of fused pairs is written front to back, one switch's rows at a time, and
        # only its written prefix is read: nothing fills it up front (1.2 GiB of zeros for a 1B
        # model at r_target 512), and in host memory its pages are touched as pairs are fused
        self._FBt = torch.empty(max(K - r, 0), m, device=store)  # fused B columns, as rows
        self._FA = torch.empty(max(K - r, 0), n, device=store)
        self.original: Optional[torch.Tensor] = None  # original W (m x n, its dtype) or None
        self.residual: Optional[torch.Tensor] = None  # int8 rounding residual of W, or None

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
        return self._FBt[:self.fused()].T

    @property
    def FA(self) -> torch.Tensor:
        """The fused A rows, ``fused() x n`` (a view of the written ledger)."""
        return self._FA[:self.fused()]

    def state_shapes(self, p: int) -> dict[str, tuple]:
        """Shapes of this module's ``state_dict`` tensors at pointer ``p``."""
        (m, n), f = self.layer.shape, self.fused(p)
        return {"U": (m, self.K), "S": (self.K,), "Vh": (self.K, n), "FB": (m, f), "FA": (f, n)}

    def store_fused(self, B_low: torch.Tensor, A_low: torch.Tensor) -> None:
        """Write the pairs fused by the switch that just advanced ``p`` into the ledger."""
        k = B_low.shape[1]
        f0 = self.fused() - k
        self._FBt[f0:f0 + k] = B_low.T.to(self._FBt.device)
        self._FA[f0:f0 + k] = A_low.to(self._FA.device)

    def load(self, m: dict) -> None:
        """Write a checked ``state_dict`` entry of this module (its shapes match ``p``)."""
        for key in ("U", "S", "Vh"):
            getattr(self, key).copy_(m[key])
        self.p = int(m["p"])
        f = self.fused()
        self._FBt[:f].copy_(m["FB"].T)
        self._FA[:f].copy_(m["FA"])
        if self.original is not None and "original" in m:
            self.original.copy_(m["original"])
        if self.residual is not None and "residual" in m:
            self.residual.copy_(m["residual"])

    @staticmethod
    def fetch(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """``t`` (a slice of this module's stored state) on ``dev``; async from pinned memory."""
        return t.to(dev, non_blocking=t.device.type == "cpu" and t.is_pinned())
