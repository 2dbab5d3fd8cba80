"""SRLoRA under FSDP2 (``torch.distributed.fsdp.fully_shard``), with ``fusion="virtual"``.

After ``fully_shard`` every parameter is a DTensor sharded on dim 0 over a 1-D mesh: a rank holds
a block of rows of the frozen weight, of ``lora_A`` (r x n: some slots' rows) and of ``lora_B``
(m x r: a row-slice of every slot's column), and FSDP reduce-scatters the gradients into those
shards. What SRLoRA does with that (docs/distributed.md, "FSDP2"):

* the frozen weight is never written (``fusion="virtual"`` is required): the residual, the fused
  pairs and the subtracted directions are the replicated side-path buffers of
  :mod:`srlora.virtual`, plain tensors outside FSDP that every rank computes identically;
* the SVD cache and ledger are replicated (computed at ``srlora.wrap``, before sharding, by the
  shared set-up of :mod:`srlora.distributed`);
* the importance state is sharded like the factors (:class:`ShardedImportance`): each rank folds
  its local ``|w*g|`` into the state of its own elements, with no communication per step;
* a switch (:class:`ShardedSwitch`) gathers, in one all-gather per dtype, the full factors and
  the full element scores of the modules it switches; every rank then feeds them to the
  ordinary switch (:func:`srlora.switch.plan_switch` / ``apply_switch``, which take tensors and
  callables, no controller), so the pair scores, the chosen slots,
  the new directions and the side buffers are bitwise the same everywhere; each rank writes back
  its own rows of ``A`` and ``B``, zeroes the optimizer state of its rows of the chosen slots, and
  resets its part of the importance.

The controller binds here when it meets DTensor factors (``attach``, ``step(optimizer)`` or
``switch_now``): :func:`bind` returns the sharded importance and switch, the controller keeps
them. Checkpoints gather the full state (:func:`full`) and load it back into the shards
(:func:`shard_like`). The DTensor helpers live in :mod:`srlora.fsdp_tensors`, the checks in
:mod:`srlora.fsdp_checks`; both are re-exported here.
"""

from __future__ import annotations

from typing import Optional

import torch

from .factors import pair_scores
from .fsdp_checks import check, check_fusion, check_variants, is_sharded_model  # noqa: F401
from .fsdp_tensors import (
    DTensor,
    copy_into_,
    full,
    full_tree,
    gather_rows,  # noqa: F401
    is_dtensor,
    local_rows,
    row_range,
    shard_like,
    unsharded,
)
from .importance import ImportanceTracker
from .switch import apply_switch, plan_switch, reset_importance


def bind(
    config,
    layers: list,
    importance: ImportanceTracker,
    modules: list,
    names: list,
    current: Optional["ShardedSwitch"] = None,
) -> tuple[ImportanceTracker, "ShardedSwitch"]:
    """Check (:func:`check`) and bind to the current DTensor factors of ``layers``: returns the
    importance state as a :class:`ShardedImportance` (carrying over ``importance``'s state so
    far) and the :class:`ShardedSwitch`; ``(importance, current)`` when already bound to these
    parameters. ``names``: per module, the importance names of its (A, B)."""
    check(config, layers)
    params = [p for L in layers for p in (L.lora_A, L.lora_B)]
    if current is not None and all(a is b for a, b in zip(current.params, params)):
        return importance, current
    old = importance.flat_state()  # whole on every rank (collective if already sharded)
    tracker = ShardedImportance(
        {n: p for pair, L in zip(names, layers) for n, p in zip(pair, (L.lora_A, L.lora_B))},
        config.beta1,
        config.beta2,
    )
    tracker.load_flat_state(old)
    return tracker, ShardedSwitch(modules, layers, params, names)


# ---------------------------------------------------------------------- importance
class ShardedImportance(ImportanceTracker):
    """The importance state of DTensor factors, kept for this rank's rows only.

    ``flat_state`` and ``load_flat_state`` speak the single-process layout (whole tensors,
    gathered or split here), so checkpoints do not depend on the number of ranks; both are
    collectives under FSDP2."""

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if is_dtensor(p) else p

    @staticmethod
    def _operands(params: list) -> tuple[list, list]:
        return (
            [p.to_local() for p in params],
            [None if p.grad is None else p.grad.to_local() for p in params],
        )

    def full_scores(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Whole element scores ``ibar * ubar`` of ``names`` (one all-gather)."""
        whole = gather_rows([(self.scores(k), self.params[k]) for k in names])
        return dict(zip(names, whole))

    def flat_state(self) -> dict[str, torch.Tensor]:
        names = [k for g in self._groups for k in g[0]]
        pairs = [(v, self.params[k]) for k in names for v in self._view_of[k]]
        whole = gather_rows(pairs)
        return {
            "ibar": torch.cat([whole[2 * j].reshape(-1).cpu() for j in range(len(names))])
            if names
            else torch.zeros(0),
            "ubar": torch.cat([whole[2 * j + 1].reshape(-1).cpu() for j in range(len(names))])
            if names
            else torch.zeros(0),
            "updates": self.updates.cpu(),
            "skipped": self.skipped.cpu(),
        }

    @torch.no_grad()
    def load_flat_state(self, state: dict[str, torch.Tensor]) -> None:
        off = 0
        for names, *_ in self._groups:
            for k in names:
                p, n = self.params[k], self.params[k].numel()
                start, stop = local_rows(p) if is_dtensor(p) else (0, p.shape[0])
                for key, view in zip(("ibar", "ubar"), self._view_of[k]):
                    view.copy_(state[key][off : off + n].view(p.shape)[start:stop])
                off += n
        self.updates.copy_(state["updates"])
        self.skipped.copy_(state["skipped"])

    @torch.no_grad()
    def reset(self, name: str, index: Optional[torch.Tensor] = None, dim: int = 0) -> None:
        p = self.params[name]
        if index is not None and dim == 0 and is_dtensor(p):  # global rows -> this rank's
            start, stop = local_rows(p)
            index = index[(index >= start) & (index < stop)] - start
        super().reset(name, index, dim)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


# ---------------------------------------------------------------------- the switch
def global_shape(L) -> tuple[int, int]:
    """The frozen weight's ``m x n`` shape from its (global) parameter shape."""
    w = L.base_weight.shape
    return (
        (w[1], w[0])
        if getattr(L.layer, "fan_in_fan_out", False)
        else (w[0], int(torch.Size(w[1:]).numel()))
    )


class ShardedSwitch:
    """The switch of a controller bound to FSDP2's DTensor factors ``params`` (A, B per layer):
    gathers, runs :mod:`srlora.switch` on whole tensors, writes each rank's rows back."""

    def __init__(self, modules: list, layers: list, params: list, names: list):
        self.modules, self.layers, self.params, self.names = modules, layers, params, names

    def factors(self, i: int) -> tuple:
        return self.params[2 * i], self.params[2 * i + 1]

    def check_live(self) -> None:
        """The modules must hold their sharded parameters (between optimizer steps, not between
        a forward and its backward, when FSDP2 has swapped in whole copies)."""
        live = [p for L in self.layers for p in (L.lora_A, L.lora_B)]
        if any(a is not b for a, b in zip(live, self.params)):
            raise RuntimeError(
                "SRLoRA under FSDP2: the adapted layers do not hold the sharded "
                "parameters the controller was bound to (a switch must run "
                "between optimizer steps, after backward; or the model was "
                "sharded again: attach the controller again)"
            )

    def whole_factors(self, idx: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> whole (B, A) as ``m x r``, ``r x n`` plain tensors (one all-gather per
        dtype)."""
        pairs = [(p.to_local(), p) for i in idx for p in self.factors(i)]
        whole = gather_rows(pairs)
        return {
            i: (
                whole[2 * j + 1].reshape(whole[2 * j + 1].shape[0], -1),
                whole[2 * j].reshape(whole[2 * j].shape[0], -1),
            )
            for j, i in enumerate(idx)
        }

    @torch.no_grad()
    def switch(
        self,
        todo: list[int],
        k: int,
        importance: "ShardedImportance",
        history: list,
        step: int,
        steps,
        optimizer,
        importance_reset: str,
    ) -> dict:
        """One switch of the modules ``todo``: the ordinary plan and apply on whole copies (the
        same on every rank), then each rank's rows written back, its part of the optimizer
        state and of the importance reset. ``steps``: the controller's strategies. Returns the
        history entry."""
        self.check_live()
        scores = importance.full_scores([n for i in todo for n in self.names[i]])
        whole = self.whole_factors(todo)

        def factors(idx):
            return (
                torch.stack([whole[i][0] for i in idx]),
                torch.stack([whole[i][1] for i in idx]),
            )

        def group_scores(idx):
            r = self.layers[idx[0]].r
            sA = torch.stack([scores[self.names[i][0]] for i in idx]).reshape(len(idx), r, -1)
            sB = torch.stack([scores[self.names[i][1]] for i in idx]).reshape(len(idx), -1, r)
            return pair_scores(sB, sA)

        shapes = {i: global_shape(self.layers[i]) for i in todo}
        plans = plan_switch(
            self.modules,
            todo,
            k,
            factors,
            group_scores,
            history,
            steps.selection,
            steps.insertion,
            None,
            step,
            shapes,
        )
        entry = apply_switch(self.modules, plans, k, step)  # side buffers, ledger
        for g in plans:
            for j, i in enumerate(g.idx):
                A, B = self.factors(i)
                copy_into_(A, g.A[j].view(A.shape))
                copy_into_(B, g.B[j].view(B.shape))
            reset_importance(importance, [self.names[i] for i in g.idx], g.slots, importance_reset)
        if optimizer is not None and steps.optimizer.zeroes_slots:
            chosen = {i: s for g in plans for i, s in zip(g.idx, g.slots.tolist())}
            self.zero_optimizer_slots(optimizer, chosen)
        return entry

    @torch.no_grad()
    def zero_optimizer_slots(self, optimizer, slots: dict[int, list[int]]) -> None:
        """Zero this rank's part of the optimizer state of the reinitialized slots: rows
        ``slots`` of A (those among its rows), columns ``slots`` of its rows of B."""
        state = optimizer.state
        for i, chosen in slots.items():
            A, B = self.factors(i)
            start, stop = local_rows(A)
            rows = [s - start for s in chosen if start <= s < stop]
            for p, dim in ((A, 0), (B, 1)):
                for v in state.get(p, {}).values():
                    if not (torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)):
                        continue
                    local = v.to_local() if is_dtensor(v) else v  # a plain v is whole
                    at = rows if dim == 0 and is_dtensor(v) else chosen
                    if at:
                        local.view(local.shape[0], -1).index_fill_(
                            dim, torch.tensor(at, device=local.device), 0.0
                        )
