"""Per-element importance of the LoRA factors, updated with a handful of batched ops per step.

All state lives in flat fp32 buffers (one per device); each LoRA tensor owns a view into them.
A step is: one ``_foreach_addcmul_`` (``0 + g*w`` into the zeroed flat buffer) and a few in-place
whole-buffer ops, whatever the number of modules; ``|w*g|`` is formed in fp32.
Nothing syncs with the host: a step whose gradients hold NaN/Inf is skipped (state kept) and
counted on the device.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def ema_inplace(ibar: torch.Tensor, ubar: torch.Tensor, sensitivity: torch.Tensor, beta1: float,
                beta2: float) -> None:
    """``factors.ema_importance`` written into ``ibar``/``ubar`` in place (bitwise the same).

    Overwrites ``sensitivity`` (it becomes ``|I - ibar'|``); allocates nothing.
    """
    ibar.lerp_(sensitivity, 1.0 - beta1)
    ubar.lerp_(sensitivity.sub_(ibar).abs_(), 1.0 - beta2)


def ema_masked(ibar: torch.Tensor, ubar: torch.Tensor, sensitivity: torch.Tensor,
               work: torch.Tensor, finite: torch.Tensor, beta1: float, beta2: float) -> None:
    """As :func:`ema_inplace` where the 0-dim bool ``finite`` is true, else leave the state as is.

    Decides on the device, without a host sync. Overwrites ``sensitivity`` and ``work``.
    """
    torch.lerp(ibar, sensitivity, 1.0 - beta1, out=work)  # ibar'
    torch.lerp(ubar, torch.sub(sensitivity, work, out=sensitivity).abs_(), 1.0 - beta2,
               out=sensitivity)  # ubar'
    torch.where(finite, work, ibar, out=ibar)
    torch.where(finite, sensitivity, ubar, out=ubar)


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
        self._params_of: list[list[torch.nn.Parameter]] = []  # per group, in buffer order
        self._work: list = []  # per group: a second scratch buffer (accelerators only)
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
            self._params_of.append([self.params[i] for i in idx])
            self._work.append(None if device.type == "cpu" else torch.empty_like(ibar))
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.long, device=dev)
        self.skipped = torch.zeros((), dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self) -> bool:
        """Fold the current gradients into the state. Returns False if no gradient was present.

        Per device group: one ``_foreach`` op writes ``w*g`` into the zeroed flat scratch buffer, then
        a few whole-buffer passes, all in place into preallocated buffers (on the CPU a fresh
        buffer per step costs page faults that can exceed the arithmetic, and ``torch.where``
        with a 0-dim condition is slow, so the CPU path branches on the finiteness flag; on an
        accelerator :func:`ema_masked` decides on the device). The result equals
        ``factors.ema_importance`` on the flat buffers, applied only when every ``|w*g|`` is
        finite.
        """
        any_grad = False
        for (_, ibar, ubar, scratch, views), params, work in zip(self._groups, self._params_of,
                                                                 self._work):
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                live = [(p, g, v) for p, g, v in zip(params, grads, views) if g is not None]
                if not live:
                    continue
                ws, gs, vs = (list(t) for t in zip(*live))
            else:
                ws, gs, vs = params, grads, views
            any_grad = True
            scratch.zero_()  # parameters without a gradient contribute I = 0
            torch._foreach_addcmul_(vs, gs, ws)  # 0 + g*w: the product, rounded once, in fp32
            scratch.abs_()  # I = |w * g|
            # scratch >= 0, so its max is finite iff every entry is (max propagates NaN)
            finite = torch.isfinite(scratch.max())
            if work is None:  # CPU: no host sync to avoid, so branch instead of torch.where
                if bool(finite):
                    ema_inplace(ibar, ubar, scratch, self.beta1, self.beta2)
            else:
                ema_masked(ibar, ubar, scratch, work, finite, self.beta1, self.beta2)
            f = finite.to(self.updates.device)
            self.updates += f
            self.skipped += ~f
        return any_grad

    def scores(self, i: int) -> torch.Tensor:
        """Element scores ``ibar * ubar`` of parameter i, in its shape (fp32)."""
        vi, vu = self._view_of[i]
        return vi * vu

    def scores_many(self, ids: list[int]) -> torch.Tensor:
        """Element scores of parameters ``ids`` (one shape, one device), stacked: ``G x shape``."""
        vi = torch.stack([self._view_of[i][0] for i in ids])
        return vi.mul_(torch.stack([self._view_of[i][1] for i in ids]))

    @torch.no_grad()
    def reset_many(self, ids: list[int]) -> None:
        """Zero the whole state of parameters ``ids`` (one ``_foreach`` op)."""
        torch._foreach_zero_([v for i in ids for v in self._view_of[i]])

    @torch.no_grad()
    def reset(self, i: int, index: torch.Tensor | None = None, dim: int = 0) -> None:
        """Zero the state of parameter i, or only its slices ``index`` along ``dim``."""
        for v in self._view_of[i]:
            if index is None:
                v.zero_()
            else:
                v.index_fill_(dim, index.to(v.device), 0.0)

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
