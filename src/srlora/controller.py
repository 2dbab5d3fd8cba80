"""The one object that owns SRLoRA's state and schedule.

Per adapted layer it holds a :class:`~srlora.module_state.ModuleState` (the SVD cache of the
ORIGINAL weight, the pointer of directions consumed, the ledger of fused pairs, the half-precision
residual or original copy); for all factors, the importance state; and the step counter, the
schedule and the switch history. The switch's steps are strategies chosen by the config
(:mod:`srlora.strategies`: selection, insertion, schedule, exhaustion, optimizer state); this
file names none of them. The work lives in small modules: set-up in ``initialize``, the switch
in ``switch`` (fed the modules' factors and scores, never the controller), the state dict and
its check in ``controller_state``. Integrations (the optimizer hook here, the Trainer callback,
the distributed helpers) only call into it.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import controller_state, fsdp, guards
from .config import SRLoRAConfig
from .distributed import mean_over_ranks
from .engine_guard import EngineGuard
from .engines import unwrap_optimizer
from .factors import lowest_pairs, pair_scores
from .fusion import delta_factors
from .importance import ImportanceTracker
from .initialize import SVDFn, build_states, write_pissa_init_
from .insertion import GradientProbe
from .layers import AdaptedLayer
from .module_state import ModuleState
from .strategies import check_optimizer, resolve
from .switch import (
    apply_switch,
    check_module,
    hit_slots,
    plan_switch,
    ranking_keys,
    reset_importance,
    switch_groups,
)

__all__ = ["SRLoRAController", "unwrap_optimizer", "SVDFn"]


class SRLoRAController:
    """Owns SRLoRA's state and schedule for one PEFT model (adapter ``adapter``).

    Use ``attach(optimizer)`` so that every ``optimizer.step()`` updates importance and switches
    on schedule; or call ``step(optimizer)`` yourself once per optimizer step, after the step and
    before ``zero_grad``. Both give bitwise the same training.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: SRLoRAConfig,
        layers: list[AdaptedLayer],
        svd_fn: Optional[SVDFn] = None,
    ):
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
        self._reason: Optional[str] = None  # why the schedule is calling switch_now()
        self._engine = EngineGuard(model, config, layers)  # sharded engines: refused or bound
        self.sharded = None  # under FSDP2: the srlora.fsdp.ShardedSwitch bound to the shards
        self.modules: list[ModuleState] = []
        switches = config.switches
        self.steps = resolve(config, len(layers)) if switches else None  # the strategies
        self.schedule = self.steps.schedule if switches else None
        plan = None
        if config.method != "lora":  # everything computed before the first write
            self.modules, plan = build_states(config, layers, svd_fn)
        self.importance = (
            ImportanceTracker(
                {
                    self.importance_name(i, f): getattr(L, f"lora_{f}")
                    for i, L in enumerate(layers)
                    for f in "AB"
                },
                config.beta1,
                config.beta2,
            )
            if switches
            else None
        )
        self._grad_hook = (
            layers[0].lora_A.register_post_accumulate_grad_hook(self._check_stepped)
            if switches and layers
            else None
        )
        self._probe = None  # a strategy that needs the weight gradient (srlora.insertion)
        if switches and self.steps.needs("probe"):
            self._probe = GradientProbe(layers, self.switch_is_next)
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

    @property
    def switch_steps(self) -> list[int]:
        """The optimizer-step counts after which a switch happens (empty for the baselines).
        For a schedule that decides as training goes (``switch_schedule="adaptive"``) they are
        not known ahead: the steps of the switches so far (``history``)."""
        if self.schedule is None:
            return []
        planned = self.schedule.planned(self.total_steps)  # raises now if it cannot run
        return [e["step"] for e in self.history] if planned is None else planned

    def switch_is_next(self) -> bool:
        """Will the optimizer step being computed now (step ``global_step + 1``) be followed by
        a scheduled switch? (Known only for a schedule planned ahead; False when it cannot be
        built yet.)"""
        return self.schedule is not None and self.schedule.is_next(
            self.global_step, self.total_steps
        )

    # ------------------------------------------------------------------ hooks
    def _bind(self, optimizer) -> torch.optim.Optimizer:
        """The torch optimizer behind ``optimizer``, checked: an engine SRLoRA supports, and it
        trains every adapted module's factors."""
        shard = self._engine.at_bind(optimizer) if self.config.switches else False
        inner = unwrap_optimizer(optimizer)
        if self.config.switches:
            check_optimizer(self.config, inner)  # a strategy that needs Adam
        trained = {id(p) for g in inner.param_groups for p in g["params"]}
        missing = [
            L.name
            for L in self.layers
            if id(L.lora_A) not in trained or id(L.lora_B) not in trained
        ]
        if missing:
            raise ValueError(
                f"the optimizer does not train the LoRA factors of {len(missing)} "
                f"adapted module(s), e.g. {missing[0]!r}; build it from "
                "model.parameters() after srlora.wrap()"
            )
        if shard:
            self._bind_sharded()  # sharded importance state, switches on the shards
        return inner

    def _bind_sharded(self) -> None:
        names = [
            (self.importance_name(i, "A"), self.importance_name(i, "B"))
            for i in range(len(self.layers))
        ]
        self.importance, self.sharded = fsdp.bind(
            self.config, self.layers, self.importance, self.modules, names, self.sharded
        )

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
        self._reset_policy()
        self._hook = inner.register_step_post_hook(lambda opt, a, kw: guards.hooked_step(self))
        return self

    def _reset_policy(self) -> None:
        if self.steps is not None:
            self.steps.optimizer.reset()

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
            self._warn_once(
                "attach",
                "SRLoRA: the adapter is being trained, but the controller "
                "never stepped: no importance is tracked and no switch will happen "
                "(this would train plain PiSSA). Call controller.attach(optimizer), "
                "or controller.step(optimizer) after each optimizer step.",
            )

    # ------------------------------------------------------------------ per step
    def observe_loss(self, loss) -> None:
        """The training loss of the step about to be taken (a number or a scalar tensor), for
        ``switch_schedule="adaptive"``'s plateau test: call it before ``optimizer.step()``, or
        pass ``step(optimizer, loss=...)``. Under torch.distributed it is averaged over the
        ranks (a collective: every rank must call it). Non-finite losses are ignored; with the
        fixed schedule it does nothing."""
        if self.schedule is None or not self.schedule.reads_loss:
            return
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
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
            self._reset_policy()
        policy = self.config.optimizer_state
        if self.steps is not None and self.steps.needs("optimizer") and self.optimizer is None:
            raise ValueError(
                f"SRLoRAConfig.optimizer_state={policy!r} resets the optimizer "
                "state of reinitialized slots: call controller.step(optimizer) (or "
                "controller.attach(optimizer)) so the controller knows it"
            )
        self._step()

    def _step(self) -> None:
        if self.steps is None:
            self.global_step += 1
            return
        if self.optimizer is not None:  # e.g. optimizer_state="rewarm"'s per-step correction
            self.steps.optimizer.after_step(self.optimizer, self.layers, self.history)
        updated = self.importance.update()
        if not updated:
            self._warn_once(
                "nograd",
                "SRLoRA: step() found no gradient on the LoRA factors; "
                "call it after optimizer.step() and before zero_grad()",
            )
        self.global_step += 1
        guards.check_zero_gradients(self)  # zero_grad(set_to_none=False) before step()
        reason = self.schedule.decide(
            self.global_step, self.total_steps, updated, self._would_fuse, self.switchable
        )
        if reason is not None:
            self._reason = reason
            self.switch_now()

    # ------------------------------------------------------------------ the switch
    def _factors(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the factors of modules ``idx``, stacked: ``G x m x r``, ``G x r x n``."""
        Ls = [self.layers[i] for i in idx]
        return torch.stack([L.B() for L in Ls]), torch.stack([L.A() for L in Ls])

    def _group_scores(self, idx: list[int]) -> torch.Tensor:
        """Step 1, the pair scores of modules ``idx`` (one group): ``G x r`` fp32,
        ``S_j = mean_i score(B[i, j]) + mean_l score(A[j, l])``."""
        G, r = len(idx), self.layers[idx[0]].r
        imp = self.importance
        sA = imp.scores_many([self.importance_name(i, "A") for i in idx]).reshape(G, r, -1)
        sB = imp.scores_many([self.importance_name(i, "B") for i in idx]).reshape(G, -1, r)
        return pair_scores(sB, sA)

    def _would_fuse(self) -> torch.Tensor:
        """``M x k`` (host): the pairs each module's switch would fuse now."""
        k = self.config.r_prime
        sets = torch.empty(len(self.layers), k, dtype=torch.long)
        for idx in switch_groups(self.modules, list(range(len(self.layers)))):
            keys = ranking_keys(
                self.steps.selection, self._group_scores(idx), self.history, idx, self._factors
            )
            sets[idx] = lowest_pairs(keys, k).cpu()
        return sets

    def pair_scores(self, i: int) -> torch.Tensor:
        """Per-pair importance of module i (length r, fp32)."""
        return self._group_scores([i])[0]

    def switchable(self) -> list[bool]:
        """Per module: can it switch now (unused directions left, or the exhaustion strategy
        can add them)?"""
        k, ex = self.config.r_prime, self.steps.exhaustion
        return [ex.can_switch(st, k) for st in self.modules]

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
        if self.steps is None:
            raise RuntimeError(
                f"switch_now() applies to a method that switches ('srlora', "
                f"'relora'), not {self.config.method!r}"
            )
        reason, self._reason = reason or self._reason or "manual", None
        self._engine.before_switch(self._bind_sharded)  # sharded since set-up: refuse, or bind
        if int(self.importance.updates) == 0:
            why = (
                f"all {int(self.importance.skipped)} importance update(s) so far were skipped "
                "for NaN/Inf gradients"
                if int(self.importance.skipped)
                else "no importance update happened yet (is the controller attached, or "
                "step() called?)"
            )
            self._warn_once(
                "noimp",
                f"SRLoRA: switching with {why}; the pairs to fuse are "
                "chosen by index, not by importance.",
            )
        k = self.config.r_prime
        todo = [i for i, ok in enumerate(self.switchable()) if ok]  # others: exhausted
        grads = self._probe.take() if self._probe is not None else None  # (a collective)
        guards.check_zero_gradients(self, at_switch=True)
        todo = guards.finite_modules(self, todo)  # NaN/Inf factors are never fused
        if not todo:
            if self.schedule is not None:
                self.schedule.switched(self.global_step, False)
            return 0
        steps = self.steps
        if self.sharded is not None:  # FSDP2: the same switch on gathered factors (srlora.fsdp)
            entry = self.sharded.switch(
                todo,
                k,
                self.importance,
                self.history,
                self.global_step,
                steps,
                self.optimizer,
                self.config.importance_reset,
            )
        else:
            stale = [i for i in todo if self.modules[i].p + k > self.modules[i].K]
            refreshed: list[int] = []
            if stale:  # a new block first (exhaustion strategy; the model is not touched)
                for i in todo:  # the factors' shapes, checked before anything is written
                    L = self.layers[i]
                    check_module(self.modules[i], L.B(), L.A(), L.shape, 0)
                refreshed = steps.exhaustion.apply(
                    self.modules, steps.exhaustion.plan(self.modules, stale, k)
                )
            if grads is not None and not grads:
                self._warn_once(
                    "nogradient",
                    f"SRLoRA insertion={self.config.insertion!r}: this "
                    "switch saw no weight gradient (it is recorded during the step "
                    "before a scheduled switch); the new slots take the paper's "
                    "directions",
                )
            plans = plan_switch(
                self.modules,
                todo,
                k,
                self._factors,
                self._group_scores,
                self.history,
                steps.selection,
                steps.insertion,
                grads,
                self.global_step,
            )  # score, choose, fetch: reads only
            entry = apply_switch(self.modules, plans, k, self.global_step)  # fuse, new pairs
            self._write_back(plans)  # the factors, the optimizer state, the importance
            if self.optimizer is not None:
                entry.update(steps.optimizer.entry(self.optimizer, [self.layers[todo[0]]]))
            if steps.exhaustion.grows:
                entry["refreshed"] = refreshed
        entry["reason"] = reason
        self.num_switches += 1
        self.history.append(entry)
        if self.schedule is not None:
            self.schedule.switched(self.global_step, True)
        return len(todo)

    @torch.no_grad()
    def _write_back(self, plans: list) -> None:
        """Step 4's new factors into the parameters, then step 5: the optimizer state and the
        importance of the recomposed slots, per the strategies."""
        for g in plans:
            Ls = [self.layers[i] for i in g.idx]
            torch._foreach_copy_(
                [L.B() for L in Ls] + [L.A() for L in Ls], list(g.B.unbind(0)) + list(g.A.unbind(0))
            )
            if self.optimizer is not None:
                self.steps.optimizer.on_switch(self.optimizer, Ls, hit_slots(g))
            names = [(self.importance_name(i, "A"), self.importance_name(i, "B")) for i in g.idx]
            reset_importance(self.importance, names, g.slots, self.config.importance_reset)

    # ------------------------------------------------------------------ export helpers
    def delta_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (fp32) of the whole change of module i against its ORIGINAL weight:
        ``W_effective - W0 == s * Bd @ Ad`` (:func:`srlora.fusion.delta_factors`; for the LoRA
        baseline, (B, A))."""
        if self.sharded is not None and type(self.layers[i].lora_A) is not torch.nn.Parameter:
            raise RuntimeError(
                "delta_factors() under FSDP2 reads the whole factors: call it "
                "(or export_adapter) inside `with srlora.fsdp.unsharded(model):`,"
                " entered on every rank"
            )
        if not self.modules:  # method="lora": the adapter is the whole change
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
        guards.resume_total_steps(self, live)  # the new total_steps wins (docs/checkpoints.md)
        self._reset_policy()
        if self._probe is not None:
            self._probe.clear()
