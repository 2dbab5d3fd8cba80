"""DTensor helpers for FSDP2 (``fully_shard``: parameters sharded on dim 0 over a 1-D mesh):
whole tensors from shards (:func:`full`, :func:`gather_rows`), shards from whole tensors
(:func:`shard_like`, :func:`copy_into_`), this rank's rows (:func:`local_rows`), and
:func:`unsharded` to read a sharded model's trainable parameters whole. Imports nothing of
srlora but its errors."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ._errors import UnsupportedEngineError

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
            "shard_placement_fn other than dim-0 sharding is not supported)"
        )
    return start, stop


def shard_like(whole: torch.Tensor, p) -> torch.Tensor:
    """``whole`` (the full tensor, the same on every rank) as a DTensor sharded like ``p``; a
    plain ``p`` gets ``whole`` itself."""
    if not is_dtensor(p):
        return whole
    start, stop = local_rows(p)
    local = whole[start:stop].to(p.to_local().device).clone()
    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


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
            send[: sizes[mesh.get_local_rank()]] = torch.cat(flat)
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=group)
        offs = [0] * world
        for t, j in enumerate(js):
            parts = []
            for r in range(world):
                a, b = spans[r][t]
                n = (b - a) * rowsize[t]
                parts.append(recv[r][offs[r] : offs[r] + n])
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
                    whole = torch.nn.Parameter(
                        p.detach().full_tensor(), requires_grad=p.requires_grad
                    )
                    m._parameters[name] = whole
                    swapped.append((m, name, p))
        yield model
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p
