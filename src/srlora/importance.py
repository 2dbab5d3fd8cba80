"""Per-element importance of the LoRA factors, updated with a handful of batched ops per step.

All state lives in flat fp32 buffers (one per device); each LoRA tensor owns a view into them.
A step is: one ``_foreach_mul`` (w*g), one ``_foreach_copy_`` into the flat buffer, and a few
whole-buffer ops, whatever the number of modules. Nothing syncs with the host: a step whose
gradients hold NaN/Inf is skipped (state kept) and counted on the device.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .factors import ema_importance


class ImportanceTracker:
    """Smoothed sensitivity ``ibar`` and uncertainty ``ubar`` for a list of parameters."""

    def __init__(self, params: list[torch.nn.Parameter], beta1: float, beta2: float):
        self.params = list(params)
        self.beta1, self.beta2 = beta1, beta2
        groups: dict[torch.device, list[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            groups[p.device].append(i)
        self._groups = []  # (param indices, ibar, ubar, scratch, views of the three)
        self._view_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for device, idx in groups.items():
            total = sum(self.params[i].numel() for i in idx)
            ibar = torch.zeros(total, dtype=torch.float32, device=device)
            ubar = torch.zeros_like(ibar)
            scratch = torch.zeros_like(ibar)
            vi, vu, vs, off = [], [], [], 0
            for i in idx:
                p = self.params[i]
                sl = slice(off, off + p.numel())
                vi.append(ibar[sl].view(p.shape))
                vu.append(ubar[sl].view(p.shape))
                vs.append(scratch[sl].view(p.shape))
                self._view_of[i] = (vi[-1], vu[-1])
                off += p.numel()
            self._groups.append((idx, ibar, ubar, scratch, vs))
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.long, device=dev)
        self.skipped = torch.zeros((), dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self) -> bool:
        """Fold the current gradients into the state. Returns False if no gradient was present."""
        any_grad = False
        for idx, ibar, ubar, scratch, views in self._groups:
            pairs = [(self.params[i], self.params[i].grad, v) for i, v in zip(idx, views)]
            live = [(p, g, v) for p, g, v in pairs if g is not None]
            if not live:
                continue
            any_grad = True
            if len(live) < len(pairs):
                scratch.zero_()  # parameters without a gradient contribute I = 0
            ws, gs, vs = zip(*live)
            torch._foreach_copy_(list(vs), torch._foreach_mul(list(ws), list(gs)))
            scratch.abs_()
            finite = torch.isfinite(scratch).all()
            new_i, new_u = ema_importance(ibar, ubar, scratch, self.beta1, self.beta2)
            ibar.copy_(torch.where(finite, new_i, ibar))
            ubar.copy_(torch.where(finite, new_u, ubar))
            f = finite.to(self.updates.device)
            self.updates += f
            self.skipped += ~f
        return any_grad

    def scores(self, i: int) -> torch.Tensor:
        """Element scores ``ibar * ubar`` of parameter i, in its shape (fp32)."""
        vi, vu = self._view_of[i]
        return vi * vu

    @torch.no_grad()
    def reset(self, i: int, index: torch.Tensor | None = None, dim: int = 0) -> None:
        """Zero the state of parameter i, or only its slices ``index`` along ``dim``."""
        for v in self._view_of[i]:
            if index is None:
                v.zero_()
            else:
                v.index_fill_(dim, index.to(v.device), 0.0)

    def state_dict(self) -> dict:
        return {"ibar": [g[1] for g in self._groups], "ubar": [g[2] for g in self._groups],
                "updates": self.updates, "skipped": self.skipped}

    def flat_state(self) -> dict[str, torch.Tensor]:
        """The state as flat tensors (one per device group, concatenated on the CPU)."""
        return {"ibar": torch.cat([g[1].cpu() for g in self._groups]) if self._groups
                else torch.zeros(0),
                "ubar": torch.cat([g[2].cpu() for g in self._groups]) if self._groups
                else torch.zeros(0),
                "updates": self.updates.cpu(), "skipped": self.skipped.cpu()}

    @torch.no_grad()
    def load_flat_state(self, state: dict[str, torch.Tensor]) -> None:
        off = 0
        for _, ibar, ubar, _, _ in self._groups:
            n = ibar.numel()
            ibar.copy_(state["ibar"][off:off + n])
            ubar.copy_(state["ubar"][off:off + n])
            off += n
        self.updates.copy_(state["updates"])
        self.skipped.copy_(state["skipped"])

    @property
    def numel(self) -> int:
        return sum(g[1].numel() for g in self._groups)
