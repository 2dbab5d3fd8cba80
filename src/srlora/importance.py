"""Per-element importance of the LoRA factors, updated with a handful of batched ops per step.

All state lives in flat fp32 buffers (one per device); each LoRA tensor owns a view into them.
A step is: one ``_foreach_addcmul_`` (``0 + g*w`` into the zeroed flat buffer) and a few in-place
whole-buffer ops, whatever the number of modules; ``|w*g|`` is formed in fp32.
Nothing syncs with the host: a step whose gradients hold NaN/Inf is skipped (state kept) and
counted on the device.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch


def ema_(
    ibar: torch.Tensor,
    ubar: torch.Tensor,
    sensitivity: torch.Tensor,
    beta1: float,
    beta2: float,
    finite: Optional[torch.Tensor] = None,
    work: Optional[torch.Tensor] = None,
) -> None:
    """One step of AdaLoRA's smoothed sensitivity and uncertainty (paper Eqs. 3-6), in place.

    ``ibar' = b1*ibar + (1-b1)*I``; ``ubar' = b2*ubar + (1-b2)*|I - ibar'|`` with ``I`` =
    ``sensitivity`` (``|w*g|``); the element score is ``ibar' * ubar'``. Overwrites
    ``sensitivity``. With ``finite`` (a 0-dim bool tensor) the step is applied only where it is
    true, decided on the tensors' device without a host sync (``work``: a scratch buffer like
    ``ibar``); the values written are bitwise those of the unmasked step.
    """
    if finite is None:
        ibar.lerp_(sensitivity, 1.0 - beta1)
        ubar.lerp_(sensitivity.sub_(ibar).abs_(), 1.0 - beta2)
        return
    torch.lerp(ibar, sensitivity, 1.0 - beta1, out=work)  # ibar'
    torch.lerp(
        ubar, torch.sub(sensitivity, work, out=sensitivity).abs_(), 1.0 - beta2, out=sensitivity
    )  # ubar'
    torch.where(finite, work, ibar, out=ibar)
    torch.where(finite, sensitivity, ubar, out=ubar)


class ImportanceTracker:
    """Smoothed sensitivity ``ibar`` and uncertainty ``ubar`` of named parameters.

    ``params`` maps a name (the controller uses ``"<module>.lora_A"`` / ``"<module>.lora_B"``) to
    its parameter; every method addresses the state by those names.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], beta1: float, beta2: float):
        self.params = dict(params)
        self.beta1, self.beta2 = beta1, beta2
        groups: dict[torch.device, list[str]] = defaultdict(list)
        for name, p in self.params.items():
            groups[p.device].append(name)
        self._groups = []  # per device: (names, ibar, ubar, scratch, scratch views, params, work)
        self._view_of: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for device, names in groups.items():
            total = sum(self._local(self.params[k]).numel() for k in names)
            ibar = torch.zeros(total, dtype=torch.float32, device=device)
            ubar, scratch = torch.zeros_like(ibar), torch.zeros_like(ibar)
            views, off = [], 0
            for k in names:
                p = self._local(self.params[k])
                sl = slice(off, off + p.numel())
                self._view_of[k] = (ibar[sl].view(p.shape), ubar[sl].view(p.shape))
                views.append(scratch[sl].view(p.shape))
                off += p.numel()
            # on the host a branch on the finiteness flag costs nothing; on an accelerator the
            # masked update (a second scratch buffer) avoids a host sync per step
            work = None if device.type == "cpu" else torch.empty_like(ibar)
            self._groups.append(
                (names, ibar, ubar, scratch, views, [self.params[k] for k in names], work)
            )
        dev = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.long, device=dev)
        self.skipped = torch.zeros((), dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self) -> bool:
        """Fold the current gradients into the state. Returns False if no gradient was present.

        Per device group: one ``_foreach`` op writes ``w*g`` into the zeroed flat scratch buffer,
        then a few whole-buffer passes, all in place into preallocated buffers (on the CPU a
        fresh buffer per step costs page faults that can exceed the arithmetic). The step
        (:func:`ema_`) is applied only when every ``|w*g|`` is finite; otherwise the state is
        kept and the step counted in ``skipped``.
        """
        any_grad = False
        for _, ibar, ubar, scratch, views, params, work in self._groups:
            params, grads = self._operands(params)
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
            if ibar.device.type == "cpu":
                if bool(finite):
                    ema_(ibar, ubar, scratch, self.beta1, self.beta2)
            else:
                ema_(ibar, ubar, scratch, self.beta1, self.beta2, finite, work)
            f = finite.to(self.updates.device)
            self.updates += f
            self.skipped += ~f
        return any_grad

    # the tensors the state is kept for; srlora.fsdp's subclass: the local shards of DTensors
    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p

    @staticmethod
    def _operands(params: list) -> tuple[list, list]:
        """The parameters and their gradients as the state sees them."""
        return params, [p.grad for p in params]

    def scores(self, name: str) -> torch.Tensor:
        """Element scores ``ibar * ubar`` of parameter ``name``, in its shape (fp32)."""
        vi, vu = self._view_of[name]
        return vi * vu

    def scores_many(self, names: list[str]) -> torch.Tensor:
        """Element scores of parameters ``names`` (one shape, one device): ``G x shape``."""
        vi = torch.stack([self._view_of[k][0] for k in names])
        return vi.mul_(torch.stack([self._view_of[k][1] for k in names]))

    def state_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``(ibar, ubar)`` of parameter ``name`` (writing into them edits the state)."""
        return self._view_of[name]

    @torch.no_grad()
    def reset_many(self, names: list[str]) -> None:
        """Zero the whole state of parameters ``names`` (one ``_foreach`` op)."""
        torch._foreach_zero_([v for k in names for v in self._view_of[k]])

    @torch.no_grad()
    def reset(self, name: str, index: Optional[torch.Tensor] = None, dim: int = 0) -> None:
        """Zero the state of parameter ``name``, or only its slices ``index`` along ``dim``."""
        for v in self._view_of[name]:
            if index is None:
                v.zero_()
            else:
                v.index_fill_(dim, index.to(v.device), 0.0)

    def flat_state(self) -> dict[str, torch.Tensor]:
        """The state as flat tensors (one per device group, concatenated on the CPU)."""
        return {
            "ibar": torch.cat([g[1].cpu() for g in self._groups])
            if self._groups
            else torch.zeros(0),
            "ubar": torch.cat([g[2].cpu() for g in self._groups])
            if self._groups
            else torch.zeros(0),
            "updates": self.updates.cpu(),
            "skipped": self.skipped.cpu(),
        }

    @torch.no_grad()
    def load_flat_state(self, state: dict[str, torch.Tensor]) -> None:
        off = 0
        for _, ibar, ubar, *_ in self._groups:
            n = ibar.numel()
            ibar.copy_(state["ibar"][off : off + n])
            ubar.copy_(state["ubar"][off : off + n])
            off += n
        self.updates.copy_(state["updates"])
        self.skipped.copy_(state["skipped"])

    @property
    def numel(self) -> int:
        return sum(g[1].numel() for g in self._groups)
