"""What SRLoRA needs to run under FSDP2, checked before anything is bound: ``fusion="virtual"``
(FSDP2 shards the frozen weight, which a switch must never write), strategies that declare they
run sharded (``fsdp2 = True``, srlora.strategies), and every adapted factor a DTensor sharded on
dim 0 over one 1-D mesh."""

from __future__ import annotations

import torch

from ._errors import UnsupportedEngineError
from .fsdp_tensors import Shard, is_dtensor, local_rows
from .strategies import fsdp2_refused


def is_sharded_model(model: torch.nn.Module, layers: list) -> bool:
    """True when an adapted factor is a DTensor or the model holds an FSDP2 module (an FSDP2
    launcher alone, before ``fully_shard``, or an Accelerate that fell back to DDP, is not)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = ()
    return (
        any(is_dtensor(p) for L in layers for p in (L.lora_A, L.lora_B))
        or bool(FSDPModule)
        and any(isinstance(m, FSDPModule) for m in model.modules())
    )


def check_fusion(config) -> None:
    """Raise UnsupportedEngineError unless ``fusion="virtual"`` (FSDP2 shards the weight)."""
    if config.fusion != "virtual":
        check_variants(config)  # first: their way out (relora's insertion refuses 'virtual')
        raise UnsupportedEngineError(
            "SRLoRA under FSDP2 needs SRLoRAConfig(fusion='virtual'): with fusion='weight' each "
            "switch writes the frozen weight, which FSDP2 shards across ranks. With "
            "fusion='virtual' the weight stays W0 and only the small LoRA factors and the "
            "replicated side path change (docs/distributed.md, FSDP2)"
        )


def check_variants(config) -> None:
    """Raise UnsupportedEngineError for a strategy that does not run sharded, naming it."""
    used = fsdp2_refused(config)
    if used:
        raise UnsupportedEngineError(
            f"SRLoRA under FSDP2 does not support {', '.join(used)} yet (they read whole factors "
            "or the whole importance ranking on every rank, which FSDP2 shards); use them under "
            "DDP or in one process, or the paper's defaults under FSDP2"
        )


def check(config, layers: list) -> None:
    """Raise UnsupportedEngineError unless the controller can run under FSDP2:
    ``fusion="virtual"``, every strategy served sharded, every adapted factor a DTensor
    sharded on dim 0 over one 1-D mesh."""
    check_fusion(config)
    check_variants(config)
    meshes = set()
    for L in layers:
        for f, p in (("lora_A", L.lora_A), ("lora_B", L.lora_B)):
            if not is_dtensor(p):
                raise UnsupportedEngineError(
                    f"SRLoRA under FSDP2: {L.name}.{f} is not sharded (a "
                    f"{type(p).__name__}): fully_shard the model's root too, and attach the "
                    "controller after fully_shard (or accelerator.prepare), between steps"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise UnsupportedEngineError(
                    f"SRLoRA under FSDP2: {L.name}.{f} is placed {tuple(p.placements)} on a "
                    f"{p.device_mesh.ndim}-D mesh; supported: Shard(0) on a 1-D mesh (plain "
                    "fully_shard; not HSDP or tensor parallelism)"
                )
            local_rows(p)
            meshes.add(tuple(p.device_mesh.mesh.flatten().tolist()))
    if len(meshes) > 1:  # each fully_shard call may build its own mesh: the same ranks is fine
        raise UnsupportedEngineError(
            f"SRLoRA under FSDP2: the adapted factors are sharded "
            f"over different sets of ranks {sorted(meshes)}; shard "
            "the whole model over one set"
        )
