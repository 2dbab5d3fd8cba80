"""Step, switch and set-up times: interleaved training steps of PEFT LoRA and SRLoRA, each
later switch, and the adapters' set-up (PEFT LoRA / PiSSA against ``srlora.wrap``)."""

from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from srlora.wrap import wrap
from .shapes import Shape, lora_config, loss_of, schedule_for, srlora_config, svd_settings


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Runner:
    """One model under test: a step closure and, for SRLoRA, its controller."""

    name: str
    step: Callable[[], None]
    controller: object = None
    hook_times: list = field(default_factory=list)  # controller.step() durations (s)
    switch_flags: list = field(default_factory=list)  # per timed step: did a switch happen


def make_runner(name: str, model, optimizer, shape: Shape, ids, device, controller=None) -> Runner:
    def step():
        loss_of(shape, model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runner = Runner(name, step, controller)
    if controller is not None:
        inner = controller.step  # the attach() hook calls self.step(): time it in place

        def timed_step():
            t0 = time.perf_counter()
            inner()
            _sync(device)
            runner.hook_times.append(time.perf_counter() - t0)

        controller.step = timed_step
    return runner


def interleaved_times(
    runners: list[Runner], warmup: int, blocks: int, steps_per_block: int, device: torch.device
) -> dict[str, list[list[float]]]:
    """Step times (s) per runner and block, the runners alternating A B, B A, A B, ...

    Warm-up steps run first (interleaved too) and are dropped. For a runner with a controller,
    records per timed step whether a switch happened in it.
    """

    def one(r: Runner) -> float:
        switches = r.controller.num_switches if r.controller is not None else 0
        _sync(device)
        t0 = time.perf_counter()
        r.step()
        _sync(device)
        dt = time.perf_counter() - t0
        if r.controller is not None:
            r.switch_flags.append(r.controller.num_switches > switches)
        return dt

    out: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    for i in range(warmup):
        for r in runners if i % 2 == 0 else runners[::-1]:
            one(r)
    for r in runners:
        r.hook_times.clear()
        r.switch_flags.clear()
    for _ in range(blocks):
        gc.collect()
        block = {r.name: [] for r in runners}
        for i in range(steps_per_block):
            for r in runners if i % 2 == 0 else runners[::-1]:
                block[r.name].append(one(r))
        for r in runners:
            out[r.name].append(block[r.name])
    return out


def step_summary(
    lora_blocks: list[list[float]],
    sr_blocks: list[list[float]],
    switch_flags: list[bool],
    hook_times: list[float],
) -> dict:
    """Medians, ratios and the controller's share of a step, from interleaved step times.

    ``ratio_median``: median of SRLoRA's steps / median of LoRA's.
    ``ratio_paired``: median over i of ``sr[i] / lora[i]``, each SRLoRA step against the LoRA
    step next to it (interleaved, so both saw the same machine load): the steady-state cost,
    robust to load that drifts between blocks on a shared machine.
    ``ratio_amortized``: ``ratio_paired`` over non-switch steps plus the extra time of the
    switch steps (above SRLoRA's median non-switch step) spread over all timed steps, relative
    to LoRA's median: what a run with this many switches pays.
    """
    lora = [t for b in lora_blocks for t in b]
    sr = [t for b in sr_blocks for t in b]
    if len(switch_flags) != len(sr) or len(hook_times) != len(sr):
        raise ValueError("switch flags / hook times do not match the SRLoRA steps")
    plain = [t for t, s in zip(sr, switch_flags) if not s]
    switch_steps = [t for t, s in zip(sr, switch_flags) if s]
    med_lora, med_plain = _median(lora), _median(plain)
    extra = sum(t - med_plain for t in switch_steps)
    hook_plain = [h for h, s in zip(hook_times, switch_flags) if not s]
    hook_switch = [h for h, s in zip(hook_times, switch_flags) if s]
    block_ratios = [_median(b) / _median(a) for a, b in zip(lora_blocks, sr_blocks)]
    paired = _median([b / a for a, b in zip(lora, sr)])
    paired_plain = _median([b / a for a, b, s in zip(lora, sr, switch_flags) if not s])
    return {
        "steps_timed": len(sr),
        "lora_median_s": med_lora,
        "srlora_median_s": _median(sr),
        "srlora_median_nonswitch_s": med_plain,
        "lora_mean_s": statistics.fmean(lora),
        "srlora_mean_s": statistics.fmean(sr),
        "ratio_median": _median(sr) / med_lora,
        "ratio_paired": paired,
        "ratio_paired_nonswitch": paired_plain,
        "ratio_amortized": paired_plain + extra / len(sr) / med_lora,
        "ratio_mean": statistics.fmean(sr) / statistics.fmean(lora),
        "block_ratios": block_ratios,
        "switches_timed": len(switch_steps),
        "switch_step_median_s": _median(switch_steps),
        "controller_step_median_s": _median(hook_plain),
        "controller_step_fraction": _median(hook_plain) / med_plain,
        "switch_hook_median_s": _median(hook_switch),
        "switch_hook_max_s": max(hook_switch) if hook_switch else float("nan"),
    }


def switch_profile(controller, device: torch.device) -> dict:
    """Time ``switch_now()`` from where the run stands until every module's directions are used.

    A switch's cost grows with the directions already consumed when half-precision weights are
    rebuilt from their originals (the rebuild multiplies all consumed factors), so the timed
    window's early switches would understate it; this covers the whole schedule's range.
    """
    times, pointers = [], []
    while True:
        _sync(device)
        t0 = time.perf_counter()
        n = controller.switch_now()
        _sync(device)
        if n == 0:
            break
        times.append(time.perf_counter() - t0)
        pointers.append(max(controller.pointers))
    return {
        "switches": len(times),
        "first_s": times[0] if times else float("nan"),
        "median_s": _median(times),
        "last_s": times[-1] if times else float("nan"),
        "max_s": max(times) if times else float("nan"),
        "times_s": times,
        "pointer_after": pointers,
    }


# ---------------------------------------------------------------------------------- set-up / SVD
def _timed(fn: Callable, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def setup_times(
    base: torch.nn.Module,
    shape: Shape,
    device: torch.device,
    total_steps: int,
    extra: Optional[dict] = None,
    variants: bool = False,
) -> dict:
    """Wall time of putting the adapter in: PEFT LoRA, PEFT PiSSA (exact, niter 4), srlora.wrap.

    Each starts from a deep copy of ``base`` (the copy is not timed). With ``variants``, also
    srlora.wrap with one SVD call per module (no stacking) and with the other small solver.
    """
    from peft import get_peft_model

    out = {}
    for key, kw in (
        ("peft_lora_init_s", {}),
        ("peft_pissa_exact_init_s", {"init_lora_weights": "pissa"}),
        ("peft_pissa_niter4_init_s", {"init_lora_weights": "pissa_niter_4"}),
    ):
        m = copy.deepcopy(base)
        out[key] = _timed(lambda m=m: get_peft_model(m, lora_config(shape, **kw)), device)[1]
        del m
        gc.collect()
    cfg = srlora_config(shape, total_steps, schedule_for(shape, total_steps), **(extra or {}))
    runs = [("srlora_wrap_s", {})]
    if variants:
        from srlora.svd import SMALL_SOLVER

        other = "svd" if SMALL_SOLVER.get(device.type, "svd") == "eigh" else "eigh"
        out["small_solver"] = {"default": SMALL_SOLVER.get(device.type, "svd"), "other": other}
        runs += [
            ("srlora_wrap_unbatched_s", {"batch_bytes": 0}),
            ("srlora_wrap_other_solver_s", {"small": other}),
        ]
    for key, settings in runs:
        m = copy.deepcopy(base)
        with svd_settings(device.type, **settings):
            out[key] = _timed(lambda m=m: wrap(m, cfg), device)[1]
        del m
        gc.collect()
    out["srlora_svd_speedup_vs_pissa_exact"] = out["peft_pissa_exact_init_s"] / out["srlora_wrap_s"]
    return out
