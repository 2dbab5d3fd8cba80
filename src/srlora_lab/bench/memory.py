"""Peak memory, one child process per method (``python -m srlora_lab.bench '<json spec>'``)."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from srlora.svd import top_singular_directions
from srlora.wrap import wrap
from .shapes import (
    MALLOC_MMAP_THRESHOLD,
    MEMORY_RATIO_TARGET,
    Shape,
    build_base_model,
    check_device,
    lora_config,
    loss_of,
    make_batch,
    srlora_config,
    trainable,
)
from .timing import _sync


# ---------------------------------------------------------------------------------- memory
def _proc_kib(field_name: str) -> int:
    m = re.search(rf"{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field_name}")
    return int(m.group(1))


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def _warm_linalg(shape: Shape, device: torch.device) -> None:
    """Run srlora's SVD once on a random matrix of the first target's size, in every child.

    Loading LAPACK's blocked code paths and its workspaces (about 10 MiB of RSS on the CPU), or
    creating cuSOLVER's handle, is a once-per-process cost of any SVD user, not memory that
    grows with the model: it goes into the baseline of both methods.
    """
    m, n = (shape.hidden, shape.hidden)
    top_singular_directions(torch.randn(m, n, device=device), min(shape.r_target, m))
    _sync(device)


def memory_child(spec: dict) -> dict:
    """Peak memory of one method ("lora", "srlora" or "full") set up and trained ``steps`` steps.

    SRLoRA switches every ``steps // 2`` steps here, so its peak covers set-up, steps and
    switches; after the steps it calls ``switch_now()`` until every direction is used, so the
    peak also holds the fused-pair ledger at its end-of-run size (it fills as pairs are fused).

    CPU: resident set size (VmHWM) above the process after the base model was built, its peak
    reset before the adapter goes in. CUDA: ``torch.cuda.max_memory_allocated`` (absolute,
    weights included), peak reset after the base model was built. In both, the SVD runs once
    before the baseline (see :func:`_warm_linalg`); :func:`run_memory_child` also fixes glibc's
    mmap threshold so that freed tensors go back to the OS and RSS tracks live memory.
    """
    from peft import get_peft_model

    shape, device = (
        Shape(**{**spec["shape"], "targets": tuple(spec["shape"]["targets"])}),
        check_device(spec["device"]),
    )
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    base = build_base_model(shape, device, spec["seed"])
    ids = make_batch(shape, device, spec["seed"])
    _warm_linalg(shape, device)  # both methods: the one-time LAPACK load is not theirs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        _reset_rss_peak()
        base_bytes = _proc_kib("VmRSS") * 1024
    controller = None
    if spec["method"] == "lora":
        model = get_peft_model(base, lora_config(shape))
    elif spec["method"] == "full":  # the full fine-tuning yardstick: every weight trains
        model = base
        for prm in model.parameters():
            prm.requires_grad_(True)
    else:  # switch inside the measured steps, so the peak includes a switch's buffers
        model, controller = wrap(
            base,
            srlora_config(
                shape, spec["total_steps"], max(1, spec["steps"] // 2), **spec.get("state", {})
            ),
        )
    opt = torch.optim.AdamW(trainable(model), lr=spec["lr"])
    if controller is not None:
        controller.attach(opt)
    for _ in range(spec["steps"]):
        loss_of(shape, model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    while controller is not None and controller.switch_now():
        pass  # to the end of the run: the ledger at its full size
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_kib("VmHWM") * 1024
    return {
        "method": spec["method"],
        "base_bytes": base_bytes,
        "peak_bytes": peak,
        "switches": controller.num_switches if controller is not None else 0,
    }


def run_memory_child(spec: dict, timeout: float = 1800) -> dict:
    """Run :func:`memory_child` in a fresh interpreter (same srlora, same torch)."""
    src = str(Path(__file__).resolve().parents[2])  # the directory holding srlora/
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    # glibc raises its mmap threshold after the first large free, and from then on keeps freed
    # tensors in the heap: RSS would count transient set-up buffers as if still alive
    env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    proc = subprocess.run(
        [sys.executable, "-m", "srlora_lab.bench", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"memory child ({spec['method']}) failed with exit code "
            f"{proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_summary(
    lora: dict, sr: dict, cache_bytes: int, device: torch.device, ledger: int = 0
) -> dict:
    """SRLoRA's peak against ``1.03 x`` LoRA's plus the SVD cache allowance.

    ``pass`` uses the issue's allowance (SVD cache only); ``pass_with_ledger`` also allows the
    fused-pair ledger, which SRLoRA keeps (up to the size of the cache, filled as pairs are fused;
    the memory child runs every remaining switch, so its peak holds the full ledger) so that
    the export to a plain LoRA stays exact. With ``offload_device="cpu"`` (the default) both
    live in host memory, off the accelerator.

    On the CPU the figures are increments over the process with the base model built (the
    interpreter, torch and the base weights are the same for both); on CUDA they are absolute.
    """
    if device.type == "cuda":
        lo, sr_b = lora["peak_bytes"], sr["peak_bytes"]
    else:
        lo, sr_b = lora["peak_bytes"] - lora["base_bytes"], sr["peak_bytes"] - sr["base_bytes"]
    allowed = MEMORY_RATIO_TARGET * lo + cache_bytes
    return {
        "measure": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "RSS peak above the base model",
        "lora_peak_bytes": lo,
        "srlora_peak_bytes": sr_b,
        "ratio": sr_b / lo,
        "svd_cache_bytes": cache_bytes,
        "allowed_bytes": allowed,
        "pass": sr_b <= allowed,
        "ledger_bytes": ledger,
        "pass_with_ledger": sr_b <= allowed + ledger,
    }
