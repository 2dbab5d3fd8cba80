"""SRLoRA under data parallelism: one SVD set-up shared by all ranks, engine checks, replica check.

Why replicas stay identical under DistributedDataParallel (DDP):
  * the set-up SVD of each module is computed ONCE, on one rank, and broadcast
    (:func:`shared_svd_fn`; ``srlora.wrap`` uses it by itself when ``torch.distributed`` runs
    with more than one process), so no rank depends on its own floating-point luck;
  * importance is updated in an optimizer step post-hook, i.e. after DDP has all-reduced the
    gradients, so every rank folds the same gradients into the same state;
  * the pairs to fuse come from a stable sort of those scores (ties broken by index), and
    nothing random is drawn after set-up.
:func:`assert_replicas_identical` checks all of it, bitwise, on a running job.

Under FSDP2 (``fully_shard``, with ``fusion="virtual"``; :mod:`srlora.fsdp`) the same holds for
everything SRLoRA replicates, and :func:`replica_state` compares the sharded tensors whole.
FSDP1 and DeepSpeed ZeRO are refused by :func:`check_engine`.
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.distributed as dist

from .engines import check_engine, sharding_reason, unwrap_optimizer  # noqa: F401 (re-exported)
from .fsdp_tensors import full, full_tree
from .svd import top_singular_directions_many


class ReplicaMismatchError(RuntimeError):
    """SRLoRA state differs between ranks (raised on every rank, so none hangs)."""


# ---------------------------------------------------------------------- pure helpers
def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each job: costliest first, onto the least loaded rank.

    Deterministic (ties: lower job index first, then lower rank), so every rank computes the
    same assignment without talking. Equal costs give round-robin.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[j] = r
        load[r] += costs[j]
    return owners


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes: equal digests, bitwise-equal tensors."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def value_digest(v) -> str:
    """Digest of a tensor, or of any other value through its repr (floats repr exactly)."""
    if torch.is_tensor(v):
        return tensor_digest(v)
    return hashlib.sha256(repr(v).encode()).hexdigest()


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _flatten(f"{prefix}/{k}", obj[k], out)
    elif isinstance(obj, (list, tuple)) and any(torch.is_tensor(x) for x in obj):
        for k, x in enumerate(obj):
            _flatten(f"{prefix}/{k}", x, out)
    else:
        out[prefix] = obj


# ---------------------------------------------------------------------- process group
def is_distributed(group=None) -> bool:
    """True when torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(group=None) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's tensors on every rank, each on its input's device (the inputs unchanged without
    torch.distributed). A collective: every rank calls it with tensors of the same shapes."""
    if not is_distributed():
        return ts
    dev, out = _comm_device(), []
    for t in ts:
        buf = t.to(dev).contiguous()
        dist.broadcast(buf, src=0)
        out.append(buf.to(t.device))
    return out


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks, on the communication device (``t`` itself without
    torch.distributed). A collective."""
    if not is_distributed():
        return t
    buf = t.to(_comm_device()).contiguous()
    dist.all_reduce(buf)
    return buf


def mean_over_ranks(value: float) -> float:
    """The mean of a Python number over the ranks (fp64; the number itself without
    torch.distributed). A collective."""
    if not is_distributed():
        return value
    return (
        float(sum_over_ranks(torch.tensor([value], dtype=torch.float64)).item())
        / dist.get_world_size()
    )


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


# ---------------------------------------------------------------------- shared SVD set-up
def shared_svd_fn(config, group=None, check_inputs: bool = True):
    """An ``svd_fn`` for ``srlora.wrap`` that splits the set-up SVDs across ranks.

    Each module's SVD is computed by one owner rank (:func:`assign_owners` on ``m*n*k``), then
    broadcast from it, so every rank holds bitwise the same U, S, Vh and set-up time falls with
    the number of ranks. Every rank must call ``srlora.wrap`` (it is a collective).
    ``check_inputs`` first compares the targeted weights across ranks (SHA-256) and raises
    ReplicaMismatchError if a rank loaded a different checkpoint. After the call,
    ``fn.stats`` holds ``owners``, ``computed`` (module indices this rank decomposed) and
    timings in seconds (``check_s``, ``svd_s``, ``broadcast_s``).
    """

    def fn(layers, ks):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        dev, results = _comm_device(group), []
        start = time.perf_counter()
        if check_inputs:
            _check_same(
                {L.name: tensor_digest(L.W()) for L in layers},
                "target weight(s) before the SVD set-up",
                "Load the same checkpoint (and seed) on every rank.",
                group,
            )
        ks = [min(k, *L.shape) for L, k in zip(layers, ks)]
        owners = assign_owners([L.shape[0] * L.shape[1] * k for L, k in zip(layers, ks)], world)
        t0 = time.perf_counter()
        error, mine = None, {}
        try:
            own = [i for i in range(len(layers)) if owners[i] == rank]
            mine = dict(
                zip(
                    own,
                    top_singular_directions_many(
                        [layers[i].W() for i in own],
                        [ks[i] for i in own],
                        config.svd_method,
                        config.svd_oversample,
                        config.svd_niter,
                        config.svd_seed,
                        names=[layers[i].name for i in own],
                    ),
                )
            )
        except Exception as e:  # tell the other ranks before they wait on our broadcasts
            error = e
        failed = torch.tensor([0.0 if error is None else 1.0], device=dev)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError("SRLoRA's SVD set-up failed on another rank (see its error)")
        t1 = time.perf_counter()
        for i, (L, k) in enumerate(zip(layers, ks)):
            m, n = L.shape
            if i in mine:
                buf = torch.cat([t.reshape(-1).float() for t in mine.pop(i)]).to(dev)
            else:
                buf = torch.empty(m * k + k + k * n, dtype=torch.float32, device=dev)
            dist.broadcast(buf, src=_global_rank(group, owners[i]), group=group)
            buf = buf.to(L.W().device)
            results.append(
                (buf[: m * k].view(m, k), buf[m * k : m * k + k], buf[m * k + k :].view(k, n))
            )
        fn.stats = {
            "owners": owners,
            "computed": [i for i, o in enumerate(owners) if o == rank],
            "check_s": t0 - start,
            "svd_s": t1 - t0,
            "broadcast_s": time.perf_counter() - t1,
        }
        return results

    fn.stats = {}
    return fn


def default_svd_fn(config):
    """:func:`shared_svd_fn` when torch.distributed runs with > 1 process, else None (local SVD)."""
    return shared_svd_fn(config) if is_distributed() else None


# ---------------------------------------------------------------------- replica check
def _unwrap_model(model):
    while (
        model is not None and hasattr(model, "module") and isinstance(model.module, torch.nn.Module)
    ):
        model = model.module  # DDP, accelerate's wrappers
    return model


def replica_state(model, controller, optimizer=None) -> dict:
    """Every tensor and value SRLoRA makes or touches, flat by name.

    The controller's whole ``state_dict()`` (SVD cache, pointers, fused-pair ledger, originals,
    importance, step counters, switch history), each adapted layer's base weight, every
    trainable parameter of ``model`` (unwrapped from DDP), and the optimizer's state (``optimizer``
    or the one the controller is attached to). Under FSDP2 the sharded tensors are gathered whole
    (a collective: call it on every rank), so every rank must hold the same whole state.
    """
    out: dict = {}
    _flatten("controller", controller.state_dict(), out)
    for L, st in zip(controller.layers, controller.modules or [None] * len(controller.layers)):
        out[f"base/{L.name}"] = full(L.base_weight.detach())
        if st is not None and st.side is not None:  # fusion="virtual": the side path in use
            out[f"side/{L.name}/At"] = st.side.At[: st.side.R]
            out[f"side/{L.name}/Bt"] = st.side.Bt[: st.side.R]
    model = _unwrap_model(model) if model is not None else controller.model
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[f"trainable/{name}"] = full(p.detach())
    opt = optimizer if optimizer is not None else controller.optimizer
    if opt is not None:
        _flatten("optimizer", full_tree(unwrap_optimizer(opt).state_dict()["state"]), out)
    return out


def _check_same(digests: dict, what: str, hint: str, group=None) -> int:
    if not is_distributed(group):
        return len(digests)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digests, group=group)
    names = sorted(set().union(*(g.keys() for g in gathered)), key=str)
    bad = [
        (k, [r for r, g in enumerate(gathered) if g.get(k) != gathered[0].get(k)])
        for k in names
        if len({g.get(k) for g in gathered}) > 1
    ]
    if bad:
        shown = "; ".join(f"{k} (ranks {rs} differ from rank 0)" for k, rs in bad[:5])
        raise ReplicaMismatchError(
            f"{len(bad)} of {len(names)} {what} differ across ranks: "
            f"{shown}{' ...' if len(bad) > 5 else ''}. {hint}"
        )
    return len(names)


def assert_replicas_identical(model, controller, optimizer=None, group=None) -> int:
    """Check that every rank holds bitwise the same SRLoRA state; returns how many entries matched.

    Hashes each entry of :func:`replica_state` (SHA-256 of the raw bytes) and all-gathers the
    digests: a collective, so call it on every rank. Raises ReplicaMismatchError on every rank,
    naming the entries that differ. In a single process it only counts the entries.
    """
    state = replica_state(model, controller, optimizer)
    return _check_same(
        {k: value_digest(v) for k, v in state.items()},
        "SRLoRA state entries",
        "The replicas have diverged; this is a bug "
        "(or the model was changed on one rank only): please report it.",
        group,
    )
