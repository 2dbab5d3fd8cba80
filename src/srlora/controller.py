"""The one object that owns SRLoRA's state and schedule.

Per adapted layer it holds a :class:`~srlora.module_state.ModuleState` (the SVD cache of the
ORIGINAL weight, the pointer of directions consumed, the ledger of fused pairs, the half-precision
residual or original copy); for all factors, the importance state; and the step counter, the
schedule and the switch history. The work lives in small modules: set-up in ``initialize``, the
switch in ``switch`` (with ``fusion`` and ``optimizer_state``), the state dict and its check in
``controller_state``. Integrations (the optimizer hook here, the Trainer callback, the
distributed helpers) only call into it.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import controller_state, guards
from .config import SRLoRAConfig
from .engines import check_engine, is_fsdp2, sharding_reason, unwrap_optimizer
from .fusion import delta_factors
from .importance import ImportanceTracker
from .initialize import SVDFn, build_states, write_pissa_init_
from .layers import AdaptedLayer
from .module_state import ModuleState
from .refresh import apply_refresh, needs_refresh, plan_refresh
from .rewarm import Rewarm, check_optimizer
from .schedule import AdaptiveSchedule, check_adaptive, fixed_steps
from .switch import apply_switch, check_module, group_pair_scores, plan_switch

__all__ = ["SRLoRAController", "unwrap_optimizer", "SVDFn"]


class SRLoRAController:
    """Owns SRLoRA's state and schedule for one PEFT model (adapter ``adapter``).

    Use ``attach(optimizer)`` so that every ``optimizer.step()`` updates importance and switches
    on schedule; or call ``step(optimizer)`` yourself once per optimizer step, after the step and
    before ``zero_grad``. Both give bitwise the same training.
    """

    def __init__(self, model: torch.nn.Module, config: SRLoRAConfig, layers: list[AdaptedLayer],
                 svd_fn: Optional[SVDFn] = None):
        self.model = model
        self.config = config
        self.layers = layers
        self.global_step = 0
        self.num_switches = 0
        self.history: list[dict] = []  # one entry per switch event
        self.total_steps = config.total_steps
        self.optimizer: Optional[torch.optim.Optimizer] = None  # whose state a switch resets
        self._hook = None
        self._warned: set[str] = set()
        self._first_version: Optional[int] = None  # lora_A's version at the first backward
        self._switch_steps: Optional[set[int]] = None
        self._reason: Optional[str] = None  # why the schedule is calling switch_now()
        self._engine_walked: Optional[list] = None  # edited parameters at the last model walk
        self._rewarm = Rewarm()  # optimizer_state="rewarm": its per-step correction
        self.sharded = None  # under FSDP2: the srlora.fsdp.ShardedSwitch bound to the shards
        self._engine_fsdp2 = False  # FSDP2 (accepted) found at the last model walk
        self.modules: list[ModuleState] = []
        plan = None
        if config.method in ("pissa", "srlora"):  # everything computed before the first write
            self.modules, plan = build_states(config, layers, svd_fn)
        self.importance = ImportanceTracker(
            {self.importance_name(i, f): getattr(L, f"lora_{f}") for i, L in enumerate(layers)
             for f in "AB"}, config.beta1, config.beta2) if config.method == "srlora" else None
        self._grad_hook = layers[0].lora_A.register_post_accumulate_grad_hook(
            self._check_stepped) if config.method == "srlora" and layers else None
        self.schedule = AdaptiveSchedule(config, len(layers)) if (
            config.method == "srlora" and config.switch_schedule == "adaptive") else None
        self._probe = None  # insertion="gradient": the weight-gradient hooks (srlora.insertion)
        if config.method == "srlora" and config.insertion == "gradient":
            from .insertion import GradientProbe
            self._probe = GradientProbe(self)
        if plan is not None:  # the last step of the set-up: the only writes into the model
            write_pissa_init_(self.modules, plan)

    def importance_name(self, i: int, factor: str) -> str:
        """Name of module i's factor ``"A"`` or ``"B"`` in the importance state."""
        return f"{self.layers[i].name}.lora_{factor}"

    # ------------------------------------------------------------------ schedule
    def set_total_steps(self, total_steps: int) -> None:
        """Set the run length (the Trainer callback does this from ``max_steps``)."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if self.global_step > 0:  # mid-run: the schedule left is re-placed, with a warning
            return guards.resume_total_steps(self, total_steps)
        self.total_steps = total_steps
        self._switch_steps = None

    @property
    def switch_steps(self) -> list[int]:
        """The optimizer-step counts after which a switch happens (empty for the baselines).
        With ``switch_schedule="adaptive"`` they are not known ahead: the steps of the switches
        so far (``history``)."""
        if self.config.method != "srlora":
            return []
        if self.schedule is not None:
            check_adaptive(self.config, self.total_steps)  # raises now if it cannot run
            return [e["step"] for e in self.history]
        if self._switch_steps is None:
            self._switch_steps = set(fixed_steps(self.config, self.total_steps))
        return sorted(self._switch_steps)

    def switch_is_next(self) -> bool:
        """Will the optimizer step being computed now (step ``global_step + 1``) be followed by
        a scheduled switch? (The fixed schedule only; False when it cannot be built yet.)"""
        if self.schedule is not None:
            return False
        if self._switch_steps is None:
            try:
                _ = self.switch_steps
            except ValueError:
                return False
        return self.global_step + 1 in self._switch_steps

    # ------------------------------------------------------------------ hooks
    def _bind(self, optimizer) -> torch.optim.Optimizer:
        """The torch optimizer behind ``optimizer``, checked: an engine SRLoRA supports, and it
        trains every adapted module's factors."""
        fsdp2 = shard = False
        if self.config.method == "srlora":
            fsdp2 = is_fsdp2(sharding_reason(self.model, optimizer))
            if fsdp2:  # fusion="virtual"; sharded: dim-0 shards. Else refused, naming why
                from . import fsdp
                fsdp.check_fusion(self)
                fsdp.check_variants(self)
                shard = fsdp.is_sharded_model(self)
                if shard:
                    fsdp.check(self)
            check_engine(self.model, optimizer, fsdp2_ok=fsdp2)  # FSDP1 / DeepSpeed: refused
        inner = unwrap_optimizer(optimizer)
        if self.config.method == "srlora" and self.config.optimizer_state == "rewarm":
            check_optimizer(inner)
        trained = {id(p) for g in inner.param_groups for p in g["params"]}
        missing = [L.name for L in self.layers if id(L.lora_A) not in trained
                   or id(L.lora_B) not in trained]
        if missing:
            raise ValueError(f"the optimizer does not train the LoRA factors of {len(missing)} "
                             f"adapted module(s), e.g. {missing[0]!r}; build it from "
                             "model.parameters() after srlora.wrap()")
        if shard:
            fsdp.bind(self)  # sharded importance state, switches on the shards
        return inner

    def attach(self, optimizer) -> "SRLoRAController":
        """Run ``step()`` after every ``optimizer.step()`` (an optimizer step post-hook).

        Accepts wrappers that expose ``.optimizer`` (accelerate). Checks that the optimizer
        trains the adapter's factors and that the schedule is known, before hooking in.
        """
        inner = self._bind(optimizer)
        guards.check_attach(self, inner)  # attached to another optimizer: refused
        _ = self.switch_steps  # raises now if the schedule cannot be built
        guards.release(self)
        self.optimizer = inner
        self._rewarm.reset()
        self._hook = inner.register_step_post_hook(lambda opt, a, kw: guards.hooked_step(self))
        return self

    def detach(self) -> None:
        """Stop stepping after ``optimizer.step()`` (warns if switches were still to come)."""
        guards.warn_detach(self)
        if self._hook is not None:
            self._hook.remove()
        self._hook = None

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _check_stepped(self, param) -> None:
        """Runs at every backward (a grad hook on one factor): warn once if an optimizer has
        updated the adapter since the first backward but the controller never stepped."""
        if self.attached or self.global_step > 0:
            return
        if self._first_version is None:
            self._first_version = param._version
        elif param._version != self._first_version:
            self._warn_once("attach", "SRLoRA: the adapter is being trained, but the controller "
                            "never stepped: no importance is tracked and no switch will happen "
                            "(this would train plain PiSSA). Call controller.attach(optimizer), "
                            "or controller.step(optimizer) after each optimizer step.")

    # ------------------------------------------------------------------ per step
    def observe_loss(self, loss) -> None:
        """The training loss of the step about to be taken (a number or a scalar tensor), for
        ``switch_schedule="adaptive"``'s plateau test: call it before ``optimizer.step()``, or
        pass ``step(optimizer, loss=...)``. Under torch.distributed it is averaged over the
        ranks (a collective: every rank must call it). Non-finite losses are ignored; with the
        fixed schedule it does nothing."""
        if self.schedule is None:
            return
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        from .distributed import mean_over_ranks
        self.schedule.observe_loss(mean_over_ranks(value))

    def step(self, optimizer=None, loss=None) -> None:
        """One optimizer step happened: update importance, count it, switch if scheduled.

        Call it after ``optimizer.step()`` and before ``zero_grad()`` when the controller is not
        attached. ``optimizer`` (needed once, unless ``optimizer_state="keep"``) is the one whose
        state a switch resets; it is checked as ``attach`` checks it. ``loss``: this step's
        training loss, for the adaptive schedule (:meth:`observe_loss`).
        """
        guards.check_not_double_step(self)  # attached: the hook steps it already
        if loss is not None:
            self.observe_loss(loss)
        if optimizer is not None and self.optimizer is not unwrap_optimizer(optimizer):
            self.optimizer = self._bind(optimizer)
            self._rewarm.reset()
        policy = self.config.optimizer_state
        if self.config.method == "srlora" and policy != "keep" and self.optimizer is None:
            raise ValueError(f"SRLoRAConfig.optimizer_state={policy!r} resets the optimizer "
                             "state of reinitialized slots: call controller.step(optimizer) (or "
                             "controller.attach(optimizer)) so the controller knows it")
        self._step()

    def _step(self) -> None:
        if self.config.method != "srlora":
            self.global_step += 1
            return
        if self.config.optimizer_state == "rewarm" and self.optimizer is not None:
            self._rewarm(self.optimizer, self.layers, self.history)  # srlora.rewarm
        updated = self.importance.update()
        if not updated:
            self._warn_once("nograd", "SRLoRA: step() found no gradient on the LoRA factors; "
                            "call it after optimizer.step() and before zero_grad()")
        self.global_step += 1
        guards.check_zero_gradients(self)  # zero_grad(set_to_none=False) before step()
        if self.schedule is not None:
            reason = self.schedule.decide(self, updated)
            if reason is not None:
                self._reason = reason
                self.switch_now()
            return
        if self._switch_steps is None:
            _ = self.switch_steps
        if self.global_step in self._switch_steps:
            self._reason = "fixed"
            self.switch_now()

    # ------------------------------------------------------------------ the switch
    def pair_scores(self, i: int) -> torch.Tensor:
        """Per-pair importance of module i (length r, fp32)."""
        return group_pair_scores(self, [i])[0]

    def switchable(self) -> list[bool]:
        """Per module: can it switch now (unused directions left, or a refresh can add them)?"""
        k, refresh = self.config.r_prime, self.config.exhaustion == "refresh"
        return [st.p + k <= st.K or (refresh and needs_refresh(st, k)) for st in self.modules]

    @torch.no_grad()
    def switch_now(self, reason: Optional[str] = None) -> int:
        """Recompose every module that still has unused directions. Returns how many did.

        ``reason`` is recorded in the history entry ("manual" when called by hand; the
        schedule's own switches record "fixed", "ranking-settled", "loss-plateau",
        "max-interval" or "deadline"). With ``exhaustion="refresh"`` a module whose directions
        are used up first gets a new block from the SVD of its current frozen weight
        (:mod:`srlora.refresh`).

        Per module: score the pairs; choose the r' lowest; fuse them into the frozen weight and
        put the next r' unused singular directions in their slots, subtracted from the weight,
        so ``W + s*B@A`` is unchanged; reset the optimizer state of those slots and the
        importance. Everything is checked and planned before the first write: a failure leaves
        the run as it was.
        """
        if self.config.method != "srlora":
            raise RuntimeError(f"switch_now() applies to method='srlora', not "
                               f"{self.config.method!r}")
        reason, self._reason = reason or self._reason or "manual", None
        self._check_engine()  # parameters sharded since set-up: refuse before any edit
        if int(self.importance.updates) == 0:
            why = (f"all {int(self.importance.skipped)} importance update(s) so far were skipped "
                   "for NaN/Inf gradients" if int(self.importance.skipped) else
                   "no importance update happened yet (is the controller attached, or "
                   "step() called?)")
            self._warn_once("noimp", f"SRLoRA: switching with {why}; the pairs to fuse are "
                            "chosen by index, not by importance.")
        k = self.config.r_prime
        todo = [i for i, ok in enumerate(self.switchable()) if ok]  # others: exhausted
        grads = self._probe.take() if self._probe is not None else None  # (a collective)
        guards.check_zero_gradients(self, at_switch=True)
        todo = guards.finite_modules(self, todo)  # NaN/Inf factors are never fused
        if not todo:
            if self.schedule is not None:
                self.schedule.switched(self.global_step, False)
            return 0
        if self.sharded is not None:  # FSDP2: the same switch on gathered factors (srlora.fsdp)
            entry = self.sharded.switch(todo, k)
        else:
            stale = [i for i in todo if self.modules[i].p + k > self.modules[i].K]
            refreshed: list[int] = []
            if stale:  # exhaustion="refresh": a new block first (the model is not touched)
                for i in todo:  # the factors' shapes, checked before anything is written
                    check_module(self, i, 0)
                refreshed = apply_refresh(self, plan_refresh(self, stale, k))
            if grads is not None and not grads:
                self._warn_once("nogradient", "SRLoRA insertion='gradient': this switch saw no "
                                "weight gradient (it is recorded during the step before a "
                                "scheduled switch); the new slots take the paper's directions")
            plans = plan_switch(self, todo, k, grads)  # score, choose, fetch: reads only
            entry = apply_switch(self, plans, k)  # fuse, reinitialize, reset
            if self.config.exhaustion == "refresh":
                entry["refreshed"] = refreshed
        entry["reason"] = reason
        self.num_switches += 1
        self.history.append(entry)
        if self.schedule is not None:
            self.schedule.switched(self.global_step, True)
        return len(todo)

    def _check_engine(self) -> None:
        """Refuse a sharded engine (FSDP, DeepSpeed) before a switch edits anything.

        Every switch checks the launcher and each parameter it edits (DTensor, flat or ZeRO-3
        partitioned); the whole model is walked again only when those parameters are not the
        objects seen at the last walk (FSDP and FSDP2 replace them when they wrap a model; the
        old ones are held, so their ids cannot be reused). Walking the model cost 45 ms of a
        130 ms switch on the 144-module bench shape.
        """
        edited = [p for L in self.layers for p in (L.base_weight, L.lora_A, L.lora_B)]
        seen = self._engine_walked
        if seen is None or len(seen) != len(edited) or any(a is not b for a, b in
                                                           zip(seen, edited)):
            fsdp2 = is_fsdp2(sharding_reason(self.model))
            if fsdp2:  # sharded since set-up or attach: bind, unless refused
                from . import fsdp
                fsdp.check_fusion(self)
                if fsdp.is_sharded_model(self):
                    fsdp.bind(self)
            check_engine(self.model, fsdp2_ok=fsdp2)
            self._engine_walked, self._engine_fsdp2 = edited, fsdp2
        check_engine(params=edited, fsdp2_ok=self._engine_fsdp2)

    # ------------------------------------------------------------------ export helpers
    def delta_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (fp32) of the whole change of module i against its ORIGINAL weight:
        ``W_effective - W0 == s * Bd @ Ad`` (:func:`srlora.fusion.delta_factors`; for the LoRA
        baseline, (B, A))."""
        if self.sharded is not None and type(self.layers[i].lora_A) is not torch.nn.Parameter:
            raise RuntimeError("delta_factors() under FSDP2 reads the whole factors: call it "
                               "(or export_adapter) inside `with srlora.fsdp.unsharded(model):`,"
                               " entered on every rank")
        if self.config.method == "lora":
            L = self.layers[i]
            return L.B().float(), L.A().float()
        return delta_factors(self.modules[i])

    @property
    def pointers(self) -> list[int]:
        return [st.p for st in self.modules]

    @property
    def importance_updates(self) -> int:
        return int(self.importance.updates) if self.importance is not None else 0

    @property
    def skipped_importance_updates(self) -> int:
        """Steps whose gradients held NaN/Inf and were left out of the importance state."""
        return int(self.importance.skipped) if self.importance is not None else 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """All controller state: tensors, ints, strings, lists and dicts only."""
        return controller_state.state_dict(self)

    def check_state_dict(self, sd: dict) -> None:
        """Raise CheckpointMismatchError if ``sd`` cannot be loaded here; changes nothing."""
        controller_state.check_state(self, sd)

    def load_state_dict(self, sd: dict) -> None:
        """Load state saved by ``state_dict()``; checks every key and shape before writing."""
        live = self.total_steps
        controller_state.load_state(self, sd)
        self._switch_steps = None
        guards.resume_total_steps(self, live)  # the new total_steps wins (docs/checkpoints.md)
        self._rewarm.reset()
        if self._probe is not None:
            self._probe.clear()
