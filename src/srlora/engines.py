"""Which training engines SRLoRA runs under, and the refusal of the others.

A switch rewrites frozen weights (``fusion="weight"``) and LoRA factors in place, outside the
optimizer. FSDP2 (``fully_shard``: parameters become DTensors sharded on dim 0) is supported with
``fusion="virtual"``, where the frozen weight is never written and :mod:`srlora.fsdp` switches
the sharded factors; with ``fusion="weight"``, FSDP1 (flat parameters) and DeepSpeed ZeRO are
refused by :func:`check_engine`, naming what works. :func:`unwrap_optimizer` finds the torch
optimizer behind wrappers (accelerate, Lightning). Imported by the controller and by
``distributed``; imports neither.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from ._errors import UnsupportedEngineError

SUPPORTED_ENGINES = (
    "DistributedDataParallel launched with torchrun, Accelerate with its "
    "multi-process DDP (accelerate launch --multi_gpu, or --cpu), a single "
    "process, or FSDP2 (torch.distributed.fsdp.fully_shard, or accelerate "
    "launch --use_fsdp --fsdp_version 2) with SRLoRAConfig(fusion='virtual')"
)


class Engine(str):
    """A sharded engine found (the text names it and where it was seen; ``kind`` identifies it:
    "fsdp2", the one sharded engine SRLoRA can run under, "fsdp1", "deepspeed", "megatron",
    "tensor-parallel")."""

    kind: str

    def __new__(cls, kind: str, text: str) -> "Engine":
        obj = super().__new__(cls, text)
        obj.kind = kind
        return obj


def unwrap_optimizer(optimizer):
    """The innermost torch optimizer behind wrappers that expose ``.optimizer``."""
    inner = optimizer
    # accelerate's AcceleratedOptimizer (itself a torch.optim.Optimizer subclass that never runs
    # Optimizer.__init__), Lightning wrappers, ...: hook the innermost optimizer
    while (
        (nxt := getattr(inner, "optimizer", None)) is not None
        and nxt is not inner
        and hasattr(nxt, "param_groups")
    ):
        inner = nxt
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"attach() needs a torch.optim.Optimizer (or a wrapper exposing "
            f".optimizer), got {type(optimizer).__name__}"
        )
    return inner


def _module_origin(obj) -> str:
    return type(obj).__module__ or ""


def _param_reason(p) -> Optional[Engine]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = ()
    if DTensor and isinstance(p, DTensor):
        return Engine("fsdp2", "FSDP2 / tensor parallelism (DTensor parameters)")
    if getattr(p, "_is_flat_param", False):
        return Engine("fsdp1", "FSDP (FullyShardedDataParallel flat parameters)")
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return Engine("deepspeed", "DeepSpeed ZeRO-3 (partitioned parameters)")
    return None


def _module_reason(model) -> Optional[Engine]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        FSDP1 = ()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = ()
    for m in model.modules():
        if FSDP1 and isinstance(m, FSDP1):
            return Engine("fsdp1", f"FSDP ({type(m).__name__})")
        if FSDPModule and isinstance(m, FSDPModule):
            return Engine("fsdp2", f"FSDP2 (fully_shard: {type(m).__name__})")
        if _module_origin(m).startswith("deepspeed"):
            return Engine("deepspeed", f"DeepSpeed ({type(m).__name__})")
    for p in model.parameters():
        reason = _param_reason(p)
        if reason:
            return reason
    return None


def _optimizer_reason(optimizer) -> Optional[Engine]:
    seen, opt = 0, optimizer
    while opt is not None and seen < 8:
        name = type(opt).__name__
        if _module_origin(opt).startswith("deepspeed") or "DeepSpeed" in name:
            return Engine("deepspeed", f"DeepSpeed (optimizer {name})")
        for g in getattr(opt, "param_groups", None) or []:
            for p in g.get("params", []):
                reason = _param_reason(p)
                if reason:
                    return reason
        opt, seen = getattr(opt, "optimizer", None), seen + 1
    return None


def _launcher_reason() -> Optional[Engine]:
    true = ("1", "true", "yes")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in true:
        if os.environ.get("FSDP_VERSION", "1").strip() == "2":
            return Engine(
                "fsdp2",
                "FSDP2 (accelerate launch with an FSDP config: "
                "ACCELERATE_USE_FSDP is set, FSDP_VERSION=2)",
            )
        return Engine(
            "fsdp1",
            "FSDP (version 1: accelerate launch with an FSDP config: "
            "ACCELERATE_USE_FSDP is set, FSDP_VERSION is not 2; use fsdp_version: 2, "
            "i.e. FSDP2)",
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in true:
        return Engine(
            "deepspeed",
            "DeepSpeed (accelerate launch with DeepSpeed: ACCELERATE_USE_DEEPSPEED is set)",
        )
    if "accelerate.state" in sys.modules:
        shared = getattr(sys.modules["accelerate.state"].AcceleratorState, "_shared_state", {})
        kind = str(shared.get("distributed_type", ""))
        for engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            if kind.endswith(engine):
                plugin = shared.get("fsdp_plugin")
                if engine == "FSDP" and getattr(plugin, "fsdp_version", 1) == 2:
                    return Engine(
                        "fsdp2", "FSDP2 (the Accelerator was created with fsdp_version=2)"
                    )
                return Engine(
                    {"FSDP": "fsdp1", "DEEPSPEED": "deepspeed"}.get(engine, "megatron"),
                    f"{engine} (the Accelerator was created with distributed_type={engine})",
                )
    return None


def sharding_reason(model=None, optimizer=None) -> Optional[Engine]:
    """The sharded engine ``model``/``optimizer``/the launcher uses (an :class:`Engine`: its
    text names it, its ``kind`` identifies it), or None."""
    return (
        _launcher_reason()
        or (_module_reason(model) if model is not None else None)
        or (_optimizer_reason(optimizer) if optimizer is not None else None)
    )


def is_fsdp2(reason: Optional[Engine]) -> bool:
    """True when a :func:`sharding_reason` is FSDP2 (by its kind, not its text)."""
    return reason is not None and reason.kind == "fsdp2"


def check_engine(model=None, optimizer=None, params=None, fsdp2_ok: bool = False) -> None:
    """Raise UnsupportedEngineError if SRLoRA would run on an engine it does not support.

    ``params``: also check these parameters one by one (without walking a model). ``fsdp2_ok``:
    FSDP2 is accepted (the caller checked ``fusion="virtual"``); FSDP1 and DeepSpeed never are."""
    reasons = [sharding_reason(model, optimizer)] + [_param_reason(p) for p in params or ()]
    reason = next((r for r in reasons if r and not (fsdp2_ok and is_fsdp2(r))), None)
    if reason:
        raise UnsupportedEngineError(
            f"SRLoRA does not support {reason}: each switch rewrites whole frozen weights and "
            "LoRA factors in place, outside the optimizer, which needs every rank to hold them "
            f"unsharded. Supported: {SUPPORTED_ENGINES}. For a sharded model use FSDP2 with "
            "fusion='virtual' (the frozen weight is never written; docs/distributed.md). "
            "(method='lora' and 'pissa' never switch and are not refused.)"
        )


def check_engine_at_wrap(model, fusion: str) -> None:
    """``srlora.wrap``'s check: the model must still be whole (the set-up SVD reads whole
    weights), and the launcher one SRLoRA supports (an FSDP2 launcher with ``fusion="virtual"``:
    the model is sharded after ``wrap``)."""
    reason = _module_reason(model)
    if reason:
        raise UnsupportedEngineError(
            f"srlora.wrap got a model that is already sharded ({reason}): the set-up SVD needs "
            "the whole weights. Call srlora.wrap on the whole model on every rank, then "
            "fully_shard it (FSDP2, with SRLoRAConfig(fusion='virtual')). Supported: "
            f"{SUPPORTED_ENGINES}"
        )
    check_engine(model, fsdp2_ok=fusion == "virtual")
