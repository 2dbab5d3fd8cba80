"""The whole benchmark for one shape: ``run_bench``."""

from __future__ import annotations

import copy
import gc
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from srlora.wrap import wrap
from .accuracy import pretrained_minilm_weights, svd_accuracy
from .memory import memory_summary, run_memory_child
from .report import targets
from .shapes import (
    BenchOptions,
    build_base_model,
    check_device,
    ledger_bytes,
    lora_config,
    make_batch,
    module_shapes,
    resolve_shape,
    schedule_for,
    srlora_config,
    state_options,
    svd_cache_bytes,
    trainable,
)
from .timing import interleaved_times, make_runner, setup_times, step_summary, switch_profile


# ---------------------------------------------------------------------------------- the benchmark
def machine_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        import peft
        import transformers

        info["peft"], info["transformers"] = peft.__version__, transformers.__version__
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    try:
        txt = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", txt)
        info["cpu"] = m.group(1).strip() if m else "unknown"
    except OSError:  # pragma: no cover - not Linux
        info["cpu"] = "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the whole benchmark for one shape; returns a JSON-ready dict (see ``targets``)."""
    device = check_device(opts.device)
    shape = resolve_shape(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from peft import get_peft_model

    timed = opts.blocks * opts.steps_per_block
    total = opts.warmup + timed
    interval = schedule_for(shape, total)
    log(f"building {shape.name} on {device} ...")
    base = build_base_model(shape, device, opts.seed)
    ids = make_batch(shape, device, opts.seed)

    log("set-up times (PEFT LoRA / PiSSA exact / PiSSA niter 4 / srlora.wrap) ...")
    extra = state_options(opts)
    setup = setup_times(base, shape, device, total, extra, opts.setup_variants)

    lora_model = get_peft_model(copy.deepcopy(base), lora_config(shape))
    sr_model, controller = wrap(copy.deepcopy(base), srlora_config(shape, total, interval, **extra))
    lora_opt = torch.optim.AdamW(trainable(lora_model), lr=opts.lr)
    sr_opt = torch.optim.AdamW(trainable(sr_model), lr=opts.lr)
    controller.attach(sr_opt)
    runners = [
        make_runner("lora", lora_model, lora_opt, shape, ids, device),
        make_runner("srlora", sr_model, sr_opt, shape, ids, device, controller),
    ]
    log(
        f"interleaved steps: {opts.warmup} warm-up + {opts.blocks} x {opts.steps_per_block} "
        f"timed ..."
    )
    times = interleaved_times(runners, opts.warmup, opts.blocks, opts.steps_per_block, device)
    steps = step_summary(
        times["lora"], times["srlora"], runners[1].switch_flags, runners[1].hook_times
    )
    steps["switches_total"] = controller.num_switches
    steps["switch_steps"] = controller.switch_steps
    log("every remaining switch, one after another, until the directions run out ...")
    steps["switch_profile"] = switch_profile(controller, device)
    shapes = module_shapes(controller)
    del lora_model, sr_model, lora_opt, sr_opt, runners
    gc.collect()

    log("SVD accuracy against an exact SVD ...")
    from peft.tuners.tuners_utils import check_target_module_exists

    pcfg = lora_config(shape)
    originals = [
        mod.weight
        for name, mod in base.named_modules()
        if name and check_target_module_exists(pcfg, name)
    ]
    svd = svd_accuracy(
        _spread(originals), shape.r_target, srlora_config(shape, total), device, shape.r
    )
    svd_pre = None
    if shape.name == "minilm" and (pre := pretrained_minilm_weights()) is not None:
        svd_pre = svd_accuracy(pre, shape.r_target, srlora_config(shape, total), device, shape.r)

    mem = None
    if opts.memory:
        log("peak memory, one child process per method ...")
        spec = {
            "shape": asdict(shape),
            "device": opts.device,
            "seed": opts.seed,
            "steps": opts.memory_steps,
            "total_steps": total,
            "lr": opts.lr,
            "threads": torch.get_num_threads(),
            "state": extra,
        }
        lo = run_memory_child({**spec, "method": "lora"})
        sr = run_memory_child({**spec, "method": "srlora"})
        mem = memory_summary(
            lo,
            sr,
            svd_cache_bytes(shapes, shape.r_target),
            device,
            ledger_bytes(shapes, shape.r, shape.r_target),
        )
        fu = run_memory_child({**spec, "method": "full"})  # the full fine-tuning yardstick
        mem["full_peak_bytes"] = fu["peak_bytes"] - (
            fu["base_bytes"] if device.type != "cuda" else 0
        )
        mem["full_ratio"] = mem["full_peak_bytes"] / mem["lora_peak_bytes"]

    result = {
        "shape": asdict(shape),
        "options": asdict(opts),
        "machine": machine_info(device),
        "modules": len(shapes),
        "switch_interval": interval,
        "steps": steps,
        "setup": setup,
        "svd": svd,
        "svd_pretrained_minilm": svd_pre,
        "memory": mem,
    }
    result["targets"] = targets(result)
    return result


def _spread(weights: list[torch.Tensor], limit: int = 8) -> list[torch.Tensor]:
    """Up to ``limit`` weights, evenly spread over the list (accuracy needs not see all)."""
    if len(weights) <= limit:
        return list(weights)
    step = len(weights) / limit
    return [weights[int(i * step)] for i in range(limit)]
