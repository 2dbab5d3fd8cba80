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
  the full element scores of the modules it switches; every rank then runs the ordinary switch
  (:mod:`srlora.switch`) on those identical full copies, so the pair scores, the chosen slots,
  the new directions and the side buffers are bitwise the same everywhere; each rank writes back
  its own rows of ``A`` and ``B``, zeroes the optimizer state of its rows of the chosen slots, and
  resets its part of the importance.

The controller binds itself here when it meets DTensor factors (``attach``, ``step(optimizer)``
or ``switch_now``); checkpoints gather the full state (:func:`full`) and load it back into the
shards (:func:`shard_like`).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ._errors import UnsupportedEngineError
from .importance import ImportanceTracker
from .switch import apply_switch, plan_switch

if TYPE_CHECKING:
    from .controller import SRLoRAController

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch < 2.4
    DTensor, Shard = (), None


def is_dtensor(t) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def full(t):
    """``t`` whole: a DTensor's ``full_tensor()`` (a collective: every rank calls it), else
    ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def full_tree(obj):
    """``obj`` (dicts, lists, tuples of tensors and values) with every DTensor made whole."""
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tree(v) for v in obj)
    return full(obj)


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a dim-0 ``Shard`` on ``rank`` (torch.chunk's split: chunks of
    ``ceil(rows / world)``, the last ones shorter or empty)."""
    c = -(-rows // world) if rows else 0
    return min(rank * c, rows), min((rank + 1) * c, rows)


def local_rows(p) -> tuple[int, int]:
    """This rank's rows of the DTensor ``p`` (checked against its local shard)."""
    mesh = p.device_mesh
    start, stop = row_range(p.shape[0], mesh.size(), mesh.get_local_rank())
    if tuple(p.to_local().shape) != (stop - start,) + tuple(p.shape[1:]):
        raise UnsupportedEngineError(
            f"FSDP2 parameter of shape {tuple(p.shape)}: local shard "
            f"{tuple(p.to_local().shape)} is not rows {start}..{stop} of it (an FSDP2 "
            "shard_placement_fn other than dim-0 sharding is not supported)")
    return start, stop


def shard_like(whole: torch.Tensor, p) -> torch.Tensor:
    """``whole`` (the full tensor, the same on every rank) as a DTensor sharded like ``p``; a
    plain ``p`` gets ``whole`` itself."""
    if not is_dtensor(p):
        return whole
    start, stop = local_rows(p)
    local = whole[start:stop].to(p.to_local().device).clone()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def copy_into_(p, whole: torch.Tensor) -> None:
    """Write ``whole`` into ``p``: its own rows when ``p`` is a DTensor."""
    with torch.no_grad():
        if is_dtensor(p):
            start, stop = local_rows(p)
            p.to_local().copy_(whole[start:stop])
        else:
            p.copy_(whole)


def gather_rows(pairs: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor]:
    """Full tensors from ``(local, like)`` pairs: ``local`` holds this rank's rows of a tensor
    shaped and sharded like the DTensor ``like``. One padded all-gather per dtype; the pieces
    are joined in rank order, so every rank gets bitwise the same result."""
    out: list = [None] * len(pairs)
    by_dtype: dict = {}
    for j, (local, _) in enumerate(pairs):
        by_dtype.setdefault(local.dtype, []).append(j)
    for dtype, js in by_dtype.items():
        mesh = pairs[js[0]][1].device_mesh
        world, group = mesh.size(), mesh.get_group()
        rowsize = [int(torch.Size(pairs[j][1].shape[1:]).numel()) for j in js]
        spans = [[row_range(pairs[j][1].shape[0], world, r) for j in js] for r in range(world)]
        sizes = [sum((b - a) * n for (a, b), n in zip(sp, rowsize)) for sp in spans]
        dev = pairs[js[0]][0].device
        send = torch.zeros(max(sizes), dtype=dtype, device=dev)
        flat = [pairs[j][0].reshape(-1) for j in js]
        if flat:
            send[:sizes[mesh.get_local_rank()]] = torch.cat(flat)
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=group)
        offs = [0] * world
        for t, j in enumerate(js):
            parts = []
            for r in range(world):
                a, b = spans[r][t]
                n = (b - a) * rowsize[t]
                parts.append(recv[r][offs[r]:offs[r] + n])
                offs[r] += n
            out[j] = torch.cat(parts).view(pairs[j][1].shape)
    return out


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Inside: the trainable DTensor parameters of ``model`` (the adapter, ``modules_to_save``)
    are whole plain parameters, so code written for a plain model reads them, e.g.
    ``srlora.export_adapter`` on rank 0. A collective: enter it on every rank. The sharded
    parameters are put back on exit; writes inside are lost. Do not train inside.
    (``srlora.save_merged`` cannot run under FSDP2, which refuses ``deepcopy``: load the
    checkpoint in one process for it.)"""
    swapped = []
    try:
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if is_dtensor(p) and p.requires_grad:
                    whole = torch.nn.Parameter(p.detach().full_tensor(),
                                               requires_grad=p.requires_grad)
                    m._parameters[name] = whole
                    swapped.append((m, name, p))
        yield model
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


# ---------------------------------------------------------------------- checks
def is_sharded_model(ctl: "SRLoRAController") -> bool:
    """True when an adapted factor is a DTensor or the model holds an FSDP2 module (an FSDP2
    launcher alone, before ``fully_shard``, or an Accelerate that fell back to DDP, is not)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = ()
    return (any(is_dtensor(p) for L in ctl.layers for p in (L.lora_A, L.lora_B))
            or bool(FSDPModule) and any(isinstance(m, FSDPModule) for m in ctl.model.modules()))


def check_fusion(ctl: "SRLoRAController") -> None:
    """Raise UnsupportedEngineError unless ``fusion="virtual"`` (FSDP2 shards the weight)."""
    if ctl.config.fusion != "virtual":
        raise UnsupportedEngineError(
            "SRLoRA under FSDP2 needs SRLoRAConfig(fusion='virtual'): with fusion='weight' each "
            "switch writes the frozen weight, which FSDP2 shards across ranks. With "
            "fusion='virtual' the weight stays W0 and only the small LoRA factors and the "
            "replicated side path change (docs/distributed.md, FSDP2)")


# variants whose per-step or per-switch work reads whole factors or whole importance rankings on
# every rank; the sharded switch does not serve them yet
NOT_SHARDED = {"optimizer_state": "rewarm", "switch_schedule": "adaptive", "exhaustion": "refresh",
               "insertion": "gradient"}


def check_variants(ctl: "SRLoRAController") -> None:
    """Raise UnsupportedEngineError for a variant the FSDP2 path does not serve, naming it."""
    used = [f"{k}={v!r}" for k, v in NOT_SHARDED.items() if getattr(ctl.config, k) == v]
    if used:
        raise UnsupportedEngineError(
            f"SRLoRA under FSDP2 does not support {', '.join(used)} yet (they read whole factors "
            "or the whole importance ranking on every rank, which FSDP2 shards); use them under "
            "DDP or in one process, or the paper's defaults under FSDP2")


def check(ctl: "SRLoRAController") -> None:
    """Raise UnsupportedEngineError unless ``ctl`` can run under FSDP2: ``fusion="virtual"``,
    no variant of :data:`NOT_SHARDED`, every adapted factor a DTensor sharded on dim 0 over one
    1-D mesh."""
    check_fusion(ctl)
    check_variants(ctl)
    meshes = set()
    for L in ctl.layers:
        for f, p in (("lora_A", L.lora_A), ("lora_B", L.lora_B)):
            if not is_dtensor(p):
                raise UnsupportedEngineError(
                    f"SRLoRA under FSDP2: {L.name}.{f} is not sharded (a "
                    f"{type(p).__name__}): fully_shard the model's root too, and attach the "
                    "controller after fully_shard (or accelerator.prepare), between steps")
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise UnsupportedEngineError(
                    f"SRLoRA under FSDP2: {L.name}.{f} is placed {tuple(p.placements)} on a "
                    f"{p.device_mesh.ndim}-D mesh; supported: Shard(0) on a 1-D mesh (plain "
                    "fully_shard; not HSDP or tensor parallelism)")
            local_rows(p)
            meshes.add(tuple(p.device_mesh.mesh.flatten().tolist()))
    if len(meshes) > 1:  # each fully_shard call may build its own mesh: the same ranks is fine
        raise UnsupportedEngineError(f"SRLoRA under FSDP2: the adapted factors are sharded "
                                     f"over different sets of ranks {sorted(meshes)}; shard "
                                     "the whole model over one set")


def bind(ctl: "SRLoRAController") -> "ShardedSwitch":
    """Check (:func:`check`) and bind ``ctl`` to the current DTensor factors: its importance
    state becomes a :class:`ShardedImportance` (carrying over any state so far) and its
    switches go through :class:`ShardedSwitch`. Idempotent for the same parameters."""
    check(ctl)
    params = [p for L in ctl.layers for p in (L.lora_A, L.lora_B)]
    if ctl.sharded is not None and all(a is b for a, b in zip(ctl.sharded.params, params)):
        return ctl.sharded
    old = ctl.importance.flat_state()  # whole on every rank (collective if already sharded)
    names = {ctl.importance_name(i, f): getattr(L, f"lora_{f}")
             for i, L in enumerate(ctl.layers) for f in "AB"}
    tracker = ShardedImportance(names, ctl.config.beta1, ctl.config.beta2)
    tracker.load_flat_state(old)
    ctl.importance = tracker
    ctl.sharded = ShardedSwitch(ctl, params)
    return ctl.sharded


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
        return ([p.to_local() for p in params],
                [None if p.grad is None else p.grad.to_local() for p in params])

    def full_scores(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Whole element scores ``ibar * ubar`` of ``names`` (one all-gather)."""
        whole = gather_rows([(self.scores(k), self.params[k]) for k in names])
        return dict(zip(names, whole))

    def flat_state(self) -> dict[str, torch.Tensor]:
        names = [k for g in self._groups for k in g[0]]
        pairs = [(v, self.params[k]) for k in names for v in self._view_of[k]]
        whole = gather_rows(pairs)
        return {"ibar": torch.cat([whole[2 * j].reshape(-1).cpu() for j in range(len(names))])
                if names else torch.zeros(0),
                "ubar": torch.cat([whole[2 * j + 1].reshape(-1).cpu()
                                   for j in range(len(names))]) if names else torch.zeros(0),
                "updates": self.updates.cpu(), "skipped": self.skipped.cpu()}

    @torch.no_grad()
    def load_flat_state(self, state: dict[str, torch.Tensor]) -> None:
        off = 0
        for names, *_ in self._groups:
            for k in names:
                p, n = self.params[k], self.params[k].numel()
                start, stop = local_rows(p) if is_dtensor(p) else (0, p.shape[0])
                for key, view in zip(("ibar", "ubar"), self._view_of[k]):
                    view.copy_(state[key][off:off + n].view(p.shape)[start:stop])
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
class _FullLayer:
    """An AdaptedLayer seen through whole (gathered) factors: what :mod:`srlora.switch` reads
    and writes; ``A``/``B`` are plain tensors, the same on every rank."""

    def __init__(self, L, A: torch.Tensor, B: torch.Tensor):
        self._L, self._A, self._B = L, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        self.name, self.layer, self.r, self.scaling = L.name, L.layer, L.r, L.scaling
        self.base_weight, self.lora_A, self.lora_B = L.base_weight, L.lora_A, L.lora_B
        w = L.base_weight.shape  # the global shape (a DTensor's, or the unsharded parameter's)
        self.shape = ((w[1], w[0]) if getattr(L.layer, "fan_in_fan_out", False)
                      else (w[0], int(torch.Size(w[1:]).numel())))

    def A(self) -> torch.Tensor:
        return self._A

    def B(self) -> torch.Tensor:
        return self._B


class _FullScores:
    """What the switch asks of the importance: whole scores (gathered before), resets (on this
    rank's shard)."""

    def __init__(self, tracker: ShardedImportance, scores: dict[str, torch.Tensor]):
        self.tracker, self.scores = tracker, scores

    def scores_many(self, names: list[str]) -> torch.Tensor:
        return torch.stack([self.scores[k] for k in names])

    def reset_many(self, names: list[str]) -> None:
        self.tracker.reset_many(names)

    def reset(self, name: str, index=None, dim: int = 0) -> None:
        self.tracker.reset(name, index, dim)


class _FullView:
    """The controller as :func:`srlora.switch.plan_switch` / ``apply_switch`` see it, over whole
    factors; the optimizer is left out (:meth:`ShardedSwitch.zero_optimizer_slots` does it)."""

    def __init__(self, ctl: "SRLoRAController", layers: list, scores: _FullScores):
        self._ctl, self.layers, self.importance, self.optimizer = ctl, layers, scores, None
        self.config, self.modules, self.history = ctl.config, ctl.modules, ctl.history
        self.global_step = ctl.global_step

    def importance_name(self, i: int, factor: str) -> str:
        return self._ctl.importance_name(i, factor)


class ShardedSwitch:
    """The switch of a controller bound to FSDP2's DTensor factors ``params`` (A, B per layer)."""

    def __init__(self, ctl: "SRLoRAController", params: list):
        self.ctl, self.params = ctl, params

    def factors(self, i: int) -> tuple:
        return self.params[2 * i], self.params[2 * i + 1]

    def check_live(self) -> None:
        """The modules must hold their sharded parameters (between optimizer steps, not between
        a forward and its backward, when FSDP2 has swapped in whole copies)."""
        live = [p for L in self.ctl.layers for p in (L.lora_A, L.lora_B)]
        if any(a is not b for a, b in zip(live, self.params)):
            raise RuntimeError("SRLoRA under FSDP2: the adapted layers do not hold the sharded "
                               "parameters the controller was bound to (a switch must run "
                               "between optimizer steps, after backward; or the model was "
                               "sharded again: attach the controller again)")

    def whole_factors(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Whole (A, B) of the modules ``idx``, as plain tensors (one all-gather per dtype)."""
        pairs = [(p.to_local(), p) for i in idx for p in self.factors(i)]
        whole = gather_rows(pairs)
        return [(whole[2 * j], whole[2 * j + 1]) for j in range(len(idx))]

    @torch.no_grad()
    def switch(self, todo: list[int], k: int) -> dict:
        """One switch of the modules ``todo``: the ordinary plan and apply on whole copies, then
        each rank's rows written back. Returns the history entry."""
        ctl = self.ctl
        self.check_live()
        names = [ctl.importance_name(i, f) for i in todo for f in "AB"]
        scores = _FullScores(ctl.importance, ctl.importance.full_scores(names))
        layers: list = list(ctl.layers)
        for i, (A, B) in zip(todo, self.whole_factors(todo)):
            layers[i] = _FullLayer(ctl.layers[i], A, B)
        view = _FullView(ctl, layers, scores)
        plans = plan_switch(view, todo, k)  # score, choose, fetch: identical on every rank
        entry = apply_switch(view, plans, k)  # side buffers, ledger, whole factors, importance
        for i in todo:
            for p, whole in zip(self.factors(i), (layers[i].A(), layers[i].B())):
                copy_into_(p, whole.view(p.shape))
        if ctl.optimizer is not None and ctl.config.optimizer_state == "zero":
            chosen = {i: s for g in plans for i, s in zip(g.idx, g.slots.tolist())}
            self.zero_optimizer_slots(chosen)
        return entry

    @torch.no_grad()
    def zero_optimizer_slots(self, slots: dict[int, list[int]]) -> None:
        """Zero this rank's part of the optimizer state of the reinitialized slots: rows
        ``slots`` of A (those among its rows), columns ``slots`` of its rows of B."""
        state = self.ctl.optimizer.state
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
                            dim, torch.tensor(at, device=local.device), 0.0)
