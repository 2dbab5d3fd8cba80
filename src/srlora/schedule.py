"""When switches fire: ``SRLoRAConfig.switch_schedule`` "fixed" (the paper) or "adaptive".

Fixed: ``k * floor(total_steps / (N + 1))`` for k = 1..N, or ``k * floor(switch_span *
total_steps / N)``, or ``k * switch_interval`` (:func:`srlora.factors.switch_steps`); when the
exhaustion strategy never runs out of directions (``exhaustion="refresh"``) and
``switch_interval`` is given, the interval continues to the end of training (every
``k * switch_interval < total_steps``).

Adaptive (:class:`AdaptiveSchedule`): the same budget (as many switches as the fixed schedule
plans) and the same ``total_steps``; with ``I`` the fixed interval, a switch fires at step t when
``t - last >= ceil(I/2)`` (``MIN_GAP``) and one of, in this order of the recorded ``reason``:

* ``"ranking-settled"``: in at least ``adaptive_settled`` of the modules that can still switch,
  the r' pairs a switch would fuse (the config's selection) were the same at the last
  ``adaptive_window`` importance updates;
* ``"loss-plateau"``: the EMA of the observed training loss (``controller.observe_loss``; EMA
  factor ``1 - 2/(W+1)``) improved by less than ``adaptive_plateau`` (relative) over the last
  ``W = adaptive_window`` observations since the last switch;
* ``"max-interval"``: ``t - last >= 2*I`` (``MAX_GAP``);
* ``"deadline"``: the switches left would no longer fit at ``ceil(I/2)`` spacing before
  ``total_steps - ceil(I/2)`` (so the last switch is never at the very end).

No switch fires after ``total_steps - ceil(I/2)``. Everything the detector keeps is in
:meth:`AdaptiveSchedule.state_dict` (ints, floats and tensors), so a resumed run fires the same
switches at the same steps. Under DDP the importance is identical on every rank and the
controller all-reduces the observed loss, so every rank decides the same.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .factors import switch_steps

MIN_GAP = 0.5  # of the fixed interval: no adaptive switch sooner after the last one
MAX_GAP = 2.0  # of the fixed interval: a switch is forced this long after the last one
REASONS = ("fixed", "ranking-settled", "loss-plateau", "max-interval", "deadline", "manual")


def fixed_steps(config, total_steps: Optional[int], unbounded: bool = False) -> list[int]:
    """The fixed schedule's switch steps (for "adaptive": its budget and interval).
    ``unbounded``: the exhaustion strategy never runs out of directions."""
    if unbounded and config.switch_interval is not None:
        if total_steps is None:
            raise ValueError(
                f"SRLoRAConfig.exhaustion={config.exhaustion!r} with switch_interval "
                "switches to the end of the run: set total_steps (the Trainer "
                "callback sets it from max_steps)"
            )
        return list(range(config.switch_interval, total_steps, config.switch_interval))
    return switch_steps(
        total_steps, config.num_switches, config.switch_interval, config.switch_span
    )


def check_adaptive(config, total_steps: Optional[int], unbounded: bool = False) -> list[int]:
    """The fixed steps the adaptive schedule budgets against; raises if it cannot run."""
    if total_steps is None:
        raise ValueError(
            "SRLoRAConfig.switch_schedule='adaptive' needs total_steps (its switches "
            "must fit before the end; the Trainer callback sets it from max_steps)"
        )
    return fixed_steps(config, total_steps, unbounded)


class AdaptiveSchedule:
    """The adaptive schedule's detector state for ``M`` modules and ``k`` pairs per switch."""

    def __init__(self, config, n_modules: int, unbounded: bool = False):
        self.config, self.unbounded = config, unbounded
        self.window = config.adaptive_window
        self.k = config.r_prime
        self.n_modules = n_modules
        self.last = 0  # step of the last switch (0: the start)
        self.fired = 0  # switches fired
        self.done = False  # a switch found nothing left to switch
        self.sets: Optional[torch.Tensor] = None  # M x k: the pairs each module would fuse
        self.runs = torch.zeros(n_modules, dtype=torch.long)  # updates each set has held
        self.loss_ema: Optional[float] = None
        self.losses: list[float] = []  # the EMA at each observation since the last switch
        self.pending: Optional[float] = None  # a loss observed since the last step
        self._fixed: tuple = (None, [])  # (total_steps, the fixed steps for it): built once

    # ------------------------------------------------------------------ inputs
    def observe_loss(self, value: float) -> None:
        """A (rank-averaged) training loss; non-finite values are ignored."""
        if math.isfinite(value):
            self.pending = float(value)

    def _take_loss(self) -> None:
        if self.pending is None:
            return
        x, self.pending = self.pending, None
        b = 1.0 - 2.0 / (self.window + 1)
        self.loss_ema = x if self.loss_ema is None else b * self.loss_ema + (1.0 - b) * x
        self.losses = (self.losses + [self.loss_ema])[-(self.window + 1) :]

    def _observe_ranking(self, sets: torch.Tensor) -> None:
        if self.sets is None:
            self.runs.fill_(1)
        else:
            same = (sets == self.sets).all(dim=1)
            self.runs = torch.where(same, self.runs + 1, torch.ones_like(self.runs))
        self.sets = sets

    # ------------------------------------------------------------------ the decision
    def gaps(self, fixed: list[int]) -> tuple[int, int]:
        interval = fixed[0] if fixed else 1
        lo = max(1, math.ceil(MIN_GAP * interval))
        return lo, max(lo, math.ceil(MAX_GAP * interval))

    def decide(
        self,
        step: int,
        total: Optional[int],
        updated: bool,
        would_fuse: Callable,
        switchable: Callable,
    ) -> Optional[str]:
        """Called once per optimizer step (after the importance update and the step count):
        the reason to switch now, or None. ``would_fuse()``: ``M x k`` (on the host) the pairs
        each module's switch would fuse now; ``switchable()``: per module, can it switch."""
        if self._fixed[0] != total:
            self._fixed = (total, check_adaptive(self.config, total, self.unbounded))
        fixed = self._fixed[1]
        self._take_loss()
        if self.done or self.fired >= len(fixed):
            return None
        lo, hi = self.gaps(fixed)
        gap = step - self.last
        if updated and gap >= lo - self.window:
            self._observe_ranking(would_fuse())
        if gap < lo or step > total - lo:
            return None
        live = torch.tensor(switchable(), dtype=torch.bool)
        if live.any() and self.sets is not None:
            settled = (self.runs[live] >= self.window).float().mean().item()
            if settled >= self.config.adaptive_settled:
                return "ranking-settled"
        if len(self.losses) == self.window + 1:
            old, new = self.losses[0], self.losses[-1]
            if old - new < self.config.adaptive_plateau * abs(old):
                return "loss-plateau"
        if gap >= hi:
            return "max-interval"
        if step >= total - (len(fixed) - self.fired) * lo:
            return "deadline"
        return None

    def switched(self, step: int, any_module: bool) -> None:
        """A switch happened at ``step`` (``any_module``: it recomposed at least one module)."""
        self.last = step
        self.fired += 1
        self.done = self.done or not any_module
        self.sets = None
        self.runs.zero_()
        self.losses = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "last": self.last,
            "fired": self.fired,
            "done": self.done,
            "sets": None if self.sets is None else self.sets.clone(),
            "runs": self.runs.clone(),
            "loss_ema": self.loss_ema,
            "losses": list(self.losses),
            "pending": self.pending,
        }

    def check_state(self, sd) -> Optional[str]:
        """What is wrong with a saved detector state, or None."""
        keys = ("last", "fired", "done", "sets", "runs", "loss_ema", "losses", "pending")
        if not isinstance(sd, dict) or any(k not in sd for k in keys):
            return "lacks the adaptive schedule's state"
        if not torch.is_tensor(sd["runs"]) or not (
            sd["sets"] is None or torch.is_tensor(sd["sets"])
        ):
            return "holds an adaptive schedule state of the wrong types"
        if tuple(sd["runs"].shape) != (self.n_modules,):
            return f"adaptive schedule state for {tuple(sd['runs'].shape)} modules"
        if sd["sets"] is not None and tuple(sd["sets"].shape) != (self.n_modules, self.k):
            return f"adaptive schedule sets of shape {tuple(sd['sets'].shape)}"
        return None

    def load_state_dict(self, sd: dict) -> None:
        self.last, self.fired, self.done = int(sd["last"]), int(sd["fired"]), bool(sd["done"])
        self.sets = None if sd["sets"] is None else sd["sets"].to("cpu", torch.long, copy=True)
        self.runs = sd["runs"].to("cpu", torch.long, copy=True)
        self.loss_ema = None if sd["loss_ema"] is None else float(sd["loss_ema"])
        self.losses = [float(x) for x in sd["losses"]]
        self.pending = None if sd["pending"] is None else float(sd["pending"])
