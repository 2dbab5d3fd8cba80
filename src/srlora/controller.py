"""The one object that owns SRLoRA's state and schedule.

It holds, per adapted layer: the SVD cache (top ``K = min(r_target, m, n)`` directions of the
ORIGINAL weight, fp32), the pointer ``p`` of directions consumed, the ledger of fused pairs (fp32
factors ``FB``/``FA``, so the whole change against the original weight stays low-rank and exact)
and, for half-precision weights, an int8 residual of the weight's rounding (or a copy of the
original weight, ``half_fusion="original"``). It holds the importance state of
all factors, the optimizer-step counter and the switch history. Integrations (the optimizer hook
here, the Trainer callback, the distributed helpers) only call into it.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, NamedTuple, Optional

import torch

from .config import SRLoRAConfig
from .factors import (join_residual, lowest_pairs, pair_scores, pissa_factors, split_residual_,
                      switch_delta, switch_factors, switch_steps)
from .importance import ImportanceTracker
from .layers import AdaptedLayer
from .module_state import ModuleState, StateStack, next_directions, write_ledger
from .svd import top_singular_directions_many

Directions = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U, S, Vh
SVDFn = Callable[[list[AdaptedLayer], list[int]], list[Directions]]


class GroupSwitch(NamedTuple):
    """What one group's switch chose and fused, stacked over its modules ``idx`` (on the
    device): ``slots`` G x k, ``scores`` G x r, ``B_low`` G x m x k, ``A_low`` G x k x n."""

    idx: list[int]
    slots: torch.Tensor
    scores: torch.Tensor
    B_low: torch.Tensor
    A_low: torch.Tensor


def unwrap_optimizer(optimizer):
    """The innermost torch optimizer behind wrappers that expose ``.optimizer``."""
    inner = optimizer
    # accelerate's AcceleratedOptimizer (itself a torch.optim.Optimizer subclass that never runs
    # Optimizer.__init__), Lightning wrappers, ...: hook the innermost optimizer
    while (nxt := getattr(inner, "optimizer", None)) is not None and nxt is not inner \
            and hasattr(nxt, "param_groups"):
        inner = nxt
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"attach() needs a torch.optim.Optimizer (or a wrapper exposing "
                        f".optimizer), got {type(optimizer).__name__}")
    return inner


class SRLoRAController:
    """Owns SRLoRA's state and schedule for one PEFT model (adapter ``adapter``).

    Use ``attach(optimizer)`` so that every ``optimizer.step()`` updates importance and switches
    on schedule; or call ``step()`` yourself once per optimizer step, after the step and before
    ``zero_grad``.
    """

    def __init__(self, model: torch.nn.Module, config: SRLoRAConfig, layers: list[AdaptedLayer],
                 svd_fn: Optional[SVDFn] = None):
        self.model = model
        self.config = config
        self.layers = layers
        self.global_step = 0
        self.num_switches = 0
        self.history: list[dict] = []  # one entry per switch event
        self._hook = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._warned: set[str] = set()
        self._manual = False  # step() called by the user instead of an attached hook
        self.total_steps = config.total_steps
        self._switch_steps: Optional[set[int]] = None
        self._engine_walked: Optional[list] = None  # edited parameters at the last model walk
        self.modules: list[ModuleState] = []
        if config.method in ("pissa", "srlora"):
            self._init_svd(svd_fn)
        params = [p for L in layers for p in (L.lora_A, L.lora_B)]
        self.importance = ImportanceTracker(params, config.beta1, config.beta2) \
            if config.method == "srlora" else None
        self._grad_hook = layers[0].lora_A.register_post_accumulate_grad_hook(
            self._check_attached) if config.method == "srlora" and layers else None

    # ------------------------------------------------------------------ set-up
    def _store_device(self, L: AdaptedLayer) -> torch.device:
        off = self.config.offload_device
        return torch.device(off) if off is not None else L.base_weight.device

    @torch.no_grad()
    def _init_svd(self, svd_fn: Optional[SVDFn]) -> None:
        cfg = self.config
        ks = [min(cfg.r_target if cfg.method == "srlora" else L.r, *L.shape) for L in self.layers]
        if svd_fn is None:
            results = top_singular_directions_many(
                [L.W() for L in self.layers], ks, cfg.svd_method, cfg.svd_oversample,
                cfg.svd_niter, cfg.svd_seed, names=[L.name for L in self.layers])
        else:
            results = svd_fn(self.layers, ks)
        # modules of one shape, K, rank and store keep their cache and ledger in one stack
        keys = [(L.shape, k, L.r, self._store_device(L)) for L, k in zip(self.layers, ks)]
        stacks = {key: StateStack(G, *key) for key, G in Counter(keys).items()}
        for L, k, key, (U, S, Vh) in zip(self.layers, ks, keys, results):
            st = ModuleState(L, k, stacks[key])
            st.U.copy_(U)
            st.S.copy_(S)
            st.Vh.copy_(Vh)
            W = L.W()
            half = W.dtype != torch.float32 and cfg.method == "srlora"
            if half and cfg.half_fusion == "original":
                st.keep_original(W)
            r0 = min(L.r, k)
            B0, A0 = pissa_factors(U[:, :r0], S[:r0], Vh[:r0], L.scaling)
            B0, A0 = B0.to(W.device), A0.to(W.device)
            L.B().zero_()
            L.A().zero_()
            L.B()[:, :r0] = B0.to(L.B().dtype)
            L.A()[:r0] = A0.to(L.A().dtype)
            W_res = W.float() - L.scaling * (B0 @ A0)
            if half and cfg.half_fusion == "residual":
                st.residual = torch.empty(W.shape, dtype=torch.int8, device=W.device)
                split_residual_(W_res, W, st.residual)
            else:
                W.copy_(W_res.to(W.dtype))
            st.p = r0
            self.modules.append(st)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run length (the Trainer callback does this from ``max_steps``)."""
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.total_steps = total_steps
        self._switch_steps = None

    @property
    def switch_steps(self) -> list[int]:
        """The optimizer-step counts after which a switch happens (empty for the baselines)."""
        if self.config.method != "srlora":
            return []
        if self._switch_steps is None:
            self._switch_steps = set(switch_steps(self.total_steps, self.config.num_switches,
                                                  self.config.switch_interval))
        return sorted(self._switch_steps)

    # ------------------------------------------------------------------ hooks
    def attach(self, optimizer) -> "SRLoRAController":
        """Run ``step()`` after every ``optimizer.step()`` (an optimizer step post-hook).

        Accepts wrappers that expose ``.optimizer`` (accelerate). Checks that the optimizer
        trains the adapter's factors and that the schedule is known, before hooking in.
        """
        if self.config.method == "srlora":
            from .distributed import check_engine
            check_engine(self.model, optimizer)  # FSDP / DeepSpeed: refused, naming what works
        inner = unwrap_optimizer(optimizer)
        trained = {id(p) for g in inner.param_groups for p in g["params"]}
        missing = [L.name for L in self.layers if id(L.lora_A) not in trained
                   or id(L.lora_B) not in trained]
        if missing:
            raise ValueError(f"the optimizer does not train the LoRA factors of {len(missing)} "
                             f"adapted module(s), e.g. {missing[0]!r}; build it from "
                             "model.parameters() after srlora.wrap()")
        _ = self.switch_steps  # raises now if the schedule cannot be built
        self.detach()
        self._optimizer = inner
        self._hook = inner.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._optimizer = None, None

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _check_attached(self, param) -> None:
        """Runs at every backward (a grad hook on one factor): warn if nothing will ever step."""
        if not self.attached and not self._manual:
            self._warn_once("attach", "SRLoRA: gradients flow into the adapter, but the "
                            "controller is not attached to an optimizer: no importance is "
                            "tracked and no switch will happen (this would train plain PiSSA). "
                            "Call "
                            "controller.attach(optimizer), or controller.step() after each "
                            "optimizer step.")

    # ------------------------------------------------------------------ per step
    def step(self) -> None:
        """One optimizer step happened: update importance, count it, switch if scheduled."""
        if self.config.method != "srlora":
            self.global_step += 1
            return
        if not self.attached:
            self._manual = True
        if not self.importance.update():
            self._warn_once("nograd", "SRLoRA: step() found no gradient on the LoRA factors; "
                            "call it after optimizer.step() and before zero_grad()")
        self.global_step += 1
        if self._switch_steps is None:
            _ = self.switch_steps
        if self.global_step in self._switch_steps:
            self.switch_now()

    # ------------------------------------------------------------------ the switch
    def pair_scores(self, i: int) -> torch.Tensor:
        """Per-pair importance of module i (length r, fp32)."""
        return self._pair_scores_many([i])[0]

    @torch.no_grad()
    def switch_now(self) -> int:
        """Recompose every module that still has unused directions. Returns how many did.

        Per module: fuse the r' lowest-scoring pairs into the frozen weight, put the next r'
        unused singular directions in their slots and subtract them from the weight, so
        ``W + s*B@A`` is unchanged; apply the optimizer-state policy to exactly those slices;
        reset the importance state.
        """
        if self.config.method != "srlora":
            raise RuntimeError(f"switch_now() applies to method='srlora', not "
                               f"{self.config.method!r}")
        self._check_engine()  # parameters sharded since set-up: refuse before any edit
        if int(self.importance.updates) == 0:
            self._warn_once("noimp", "SRLoRA: switching before any importance update; the "
                            "pairs to fuse are chosen by index, not by importance. Is the "
                            "controller attached to the optimizer?")
        k = self.config.r_prime
        todo = [i for i, st in enumerate(self.modules) if st.p + k <= st.K]  # others: exhausted
        if not todo:
            return 0
        # everything is queued on the device; modules of one shape are switched together, and
        # the host waits on the device twice per switch (directions in, choices and ledger out)
        done = [self._recompose_group(idx, k) for idx in self._switch_groups(todo)]
        self._write_ledger(done)
        order, dev0 = [i for g in done for i in g.idx], done[0].slots.device
        low = dict(zip(order, torch.cat([g.slots.to(dev0) for g in done]).cpu().tolist()))
        sc = dict(zip(order, torch.cat([g.scores.to(dev0) for g in done]).cpu().tolist()))
        low_cpu, sc_cpu = [low[i] for i in todo], [sc[i] for i in todo]
        self.num_switches += 1
        self.history.append({
            "step": self.global_step, "modules": todo, "slots": low_cpu,
            "directions": [list(range(self.modules[i].p - k, self.modules[i].p)) for i in todo],
            "scores": sc_cpu})
        return len(todo)

    def _check_engine(self) -> None:
        """Refuse a sharded engine (FSDP, DeepSpeed) before a switch edits anything.

        Every switch checks the launcher and each parameter it edits (DTensor, flat or ZeRO-3
        partitioned); the whole model is walked again only when those parameters are not the
        objects seen at the last walk (FSDP and FSDP2 replace them when they wrap a model; the
        old ones are held, so their ids cannot be reused). Walking the model cost 45 ms of a
        130 ms switch on the 144-module bench shape.
        """
        from .distributed import check_engine
        edited = [p for L in self.layers for p in (L.base_weight, L.lora_A, L.lora_B)]
        seen = self._engine_walked
        if seen is None or len(seen) != len(edited) or any(a is not b for a, b in
                                                           zip(seen, edited)):
            check_engine(self.model)
            self._engine_walked = edited
        check_engine(params=edited)

    def _switch_groups(self, todo: list[int]) -> list[list[int]]:
        """``todo`` split into groups that can be stacked: one state stack (so one shape, rank
        and store), and the same dtypes, devices and scaling (so a 112-module Llama is 3 groups,
        not 112 rounds of small ops)."""
        groups: dict = {}
        for i in todo:
            L = self.layers[i]
            key = (id(self.modules[i].stack), L.scaling) + tuple(
                (t.dtype, t.device) for t in (L.base_weight, L.lora_A, L.lora_B))
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _write_ledger(self, done: list[GroupSwitch]) -> None:
        """Store each group's fused pairs (fp32) in its ledger: one copy to each store device,
        then one write per factor and stack (groups whose weights are rebuilt from their
        originals wrote theirs during the switch)."""
        by_store: dict = {}
        for g in done:
            sts = [self.modules[i] for i in g.idx]
            if all(st.original is None for st in sts):
                by_store.setdefault(sts[0].U.device, []).append((sts, g.B_low, g.A_low))
        for store, items in by_store.items():
            flat = torch.cat([t.reshape(-1) for _, B, A in items for t in (B, A)]).to(store)
            off = 0
            for sts, B, A in items:
                nb, na = B.numel(), A.numel()
                write_ledger(sts, flat[off:off + nb].view(B.shape),
                             flat[off + nb:off + nb + na].view(A.shape))
                off += nb + na

    def _pair_scores_many(self, idx: list[int]) -> torch.Tensor:
        """Per-pair importance of modules ``idx`` (one group), ``G x r`` fp32."""
        G, r = len(idx), self.layers[idx[0]].r
        sA = self.importance.scores_many([2 * i for i in idx]).reshape(G, r, -1)
        sB = self.importance.scores_many([2 * i + 1 for i in idx]).reshape(G, -1, r)
        return pair_scores(sB, sA)

    def _recompose_group(self, idx: list[int], k: int) -> GroupSwitch:
        """The switch of the modules ``idx`` (one group), queued on the device.

        Stacked over the group: the scores, the choice of slots, the fused and the new factors,
        the writes of B and A. Per module: the frozen weight's change (:meth:`_fuse`) and the
        optimizer-state policy.
        """
        Ls = [self.layers[i] for i in idx]
        s = Ls[0].scaling
        Bs, As = [L.B() for L in Ls], [L.A() for L in Ls]
        B, A = torch.stack(Bs), torch.stack(As)  # G x m x r, G x r x n
        G = B.shape[0]
        sc = self._pair_scores_many(idx)
        low = lowest_pairs(sc, k).to(B.device)  # G x k, ascending
        at = (torch.arange(G, device=B.device)[:, None], low)  # (g, slot) index pairs, G x k
        B_low, A_low = B.transpose(1, 2)[at].transpose(1, 2).float(), A[at].float()
        B_new, A_new = pissa_factors(*next_directions([self.modules[i] for i in idx], k,
                                                      B.device), s)
        Bc, Ac = switch_factors(B_low, A_low, B_new, A_new)
        for g, i in enumerate(idx):
            self._fuse(self.modules[i], k, s, Bc[g], Ac[g], B_low[g], A_low[g], B_new[g],
                       A_new[g])
        B.transpose(1, 2)[at] = B_new.transpose(1, 2).to(B.dtype)
        A[at] = A_new.to(A.dtype)
        torch._foreach_copy_(Bs + As, list(B.unbind(0)) + list(A.unbind(0)))
        hit = torch.zeros(G, Ls[0].r, dtype=torch.bool, device=B.device)
        hit[at] = True  # the reinitialized slots
        self._apply_optimizer_policy(Ls, hit)
        if self.config.importance_reset == "module":
            self.importance.reset_many([j for i in idx for j in (2 * i, 2 * i + 1)])
        else:
            for g, i in enumerate(idx):
                self.importance.reset(2 * i, low[g], dim=0)
                self.importance.reset(2 * i + 1, low[g], dim=1)
        return GroupSwitch(idx, low, sc, B_low, A_low)

    def _fuse(self, st: ModuleState, k: int, s: float, Bc: torch.Tensor, Ac: torch.Tensor,
              B_low: torch.Tensor, A_low: torch.Tensor, B_new: torch.Tensor,
              A_new: torch.Tensor) -> None:
        """Add ``s*(B_low@A_low - B_new@A_new)`` (``= s*Bc@Ac``) to one frozen weight; advance p."""
        W = st.layer.W()
        st.p += k
        if st.original is not None:  # half_fusion="original": rebuild from W0 and all factors
            st.store_fused(B_low, A_low)  # the rebuild reads this switch's pairs too
            W.copy_(self._rebuild_base(st).to(W.dtype))
        elif st.residual is not None:  # half_fusion="residual": 8 more bits beside W
            split_residual_(join_residual(W, st.residual).addmm_(Bc, Ac, alpha=s), W,
                            st.residual)
        elif W.dtype == torch.float32:
            W.addmm_(Bc, Ac, alpha=s)
        else:  # half_fusion="inplace": round at every switch
            W.copy_((W.float() + switch_delta(B_low, A_low, B_new, A_new, s)).to(W.dtype))

    @staticmethod
    def _subtracted_factors(st: ModuleState, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA factors of directions ``0 .. p-1``: everything ever subtracted from W0."""
        return pissa_factors(st.fetch(st.U[:, :st.p], dev), st.fetch(st.S[:st.p], dev),
                             st.fetch(st.Vh[:st.p], dev), st.layer.scaling)

    def _rebuild_base(self, st: ModuleState) -> torch.Tensor:
        """``W0 - s*B_sub@A_sub + s*FB@FA`` in fp32, from the original weight: one rounding only."""
        L, s = st.layer, st.layer.scaling
        dev = L.W().device
        Bs, As = self._subtracted_factors(st, dev)
        W = st.fetch(st.original, dev).float() - s * (Bs @ As)
        if st.fused() > 0:
            W += s * (st.fetch(st.FB, dev) @ st.fetch(st.FA, dev))
        return W

    def _apply_optimizer_policy(self, Ls: list[AdaptedLayer], hit: torch.Tensor) -> None:
        """``optimizer_state="zero"``: zero the optimizer state (every parameter-shaped tensor:
        Adam's moments, SGD's momentum, ...) of the reinitialized rows of A and columns of B
        (``hit``: ``G x r``, true at the reinitialized slots). Per group and state key: the 2-D
        views stacked, one ``masked_fill_`` of zeros, one ``_foreach_copy_`` back.
        """
        if self.config.optimizer_state != "zero" or self._optimizer is None:
            return
        state = self._optimizer.state
        for params, mask in (([L.lora_A for L in Ls], hit[:, :, None]),  # rows of A
                             ([L.lora_B for L in Ls], hit[:, None, :])):  # columns of B
            per_key: dict = {}  # state key -> (group positions, 2-D views)
            for g, p in enumerate(params):
                for key, v in state.get(p, {}).items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        gs, vs = per_key.setdefault(key, ([], []))
                        gs.append(g)
                        vs.append(v.view(v.shape[0], -1))
            for gs, vs in per_key.values():
                at = mask if len(gs) == len(params) else mask[gs]
                zeroed = torch.stack(vs).masked_fill_(at.to(vs[0].device), 0.0)
                torch._foreach_copy_(vs, list(zeroed.unbind(0)))

    # ------------------------------------------------------------------ ledger / export helpers
    def delta_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (fp32) of the whole change of module i against its ORIGINAL weight.

        ``W_effective - W0 == s * Bd @ Ad`` with ``Bd = [B | FB | -B_sub]``,
        ``Ad = [A; FA; A_sub]``, rank ``r + (p - r) + p``. For the LoRA baseline, (B, A).
        """
        L = self.layers[i]
        B, A = L.B().float(), L.A().float()
        if self.config.method == "lora":
            return B, A
        st = self.modules[i]
        dev = B.device
        Bs, As = self._subtracted_factors(st, dev)
        Bd = torch.cat([B, st.FB.to(dev), -Bs], dim=1)
        Ad = torch.cat([A, st.FA.to(dev), As], dim=0)
        return Bd, Ad

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
        sd: dict = {"config": self.config.to_dict(), "global_step": self.global_step,
                    "num_switches": self.num_switches, "total_steps": self.total_steps,
                    "history": self.history, "modules": {}}
        for st in self.modules:
            m = {"p": st.p, "U": st.U, "S": st.S, "Vh": st.Vh, "FB": st.FB, "FA": st.FA}
            if st.original is not None:
                m["original"] = st.original
            if st.residual is not None:
                m["residual"] = st.residual
            sd["modules"][st.layer.name] = m
        if self.importance is not None:
            sd["importance"] = self.importance.flat_state()
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Load state saved by ``state_dict()``; checks every key and shape before writing."""
        from ._errors import CheckpointMismatchError
        mine = self.config.to_dict()
        diff = {k: (sd["config"].get(k), v) for k, v in mine.items()
                if k not in ("total_steps", "offload_device") and sd["config"].get(k) != v}
        if diff:
            raise CheckpointMismatchError(f"controller config differs (saved, current): {diff}")
        names = [st.layer.name for st in self.modules]
        if sorted(sd["modules"]) != sorted(names):
            raise CheckpointMismatchError(
                f"adapted modules differ: saved {len(sd['modules'])}, current {len(names)}; "
                f"only saved: {sorted(set(sd['modules']) - set(names))[:3]}, only current: "
                f"{sorted(set(names) - set(sd['modules']))[:3]}")
        for st in self.modules:
            m = sd["modules"][st.layer.name]
            p = m.get("p")
            if not (isinstance(p, int) and min(st.layer.r, st.K) <= p <= st.K):
                raise CheckpointMismatchError(f"{st.layer.name}: pointer {p!r} out of range "
                                              f"[{min(st.layer.r, st.K)}, {st.K}]")
            for key, want in st.state_shapes(p).items():
                if tuple(m[key].shape) != want:
                    raise CheckpointMismatchError(
                        f"{st.layer.name}.{key}: saved shape {tuple(m[key].shape)}, expected "
                        f"{want} (pointer {p})")
        if self.importance is not None:
            n = sd["importance"]["ibar"].numel()
            if n != self.importance.numel:
                raise CheckpointMismatchError(f"importance state has {n} elements, current "
                                              f"model needs {self.importance.numel}")
        for st in self.modules:
            st.load(sd["modules"][st.layer.name])
        if self.importance is not None:
            self.importance.load_flat_state(sd["importance"])
        self.global_step = int(sd["global_step"])
        self.num_switches = int(sd["num_switches"])
        self.total_steps = sd["total_steps"]
        self._switch_steps = None
        self.history = list(sd["history"])
