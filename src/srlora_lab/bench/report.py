"""The targets' pass/fail and the markdown report of one result."""

from __future__ import annotations

import math

from .shapes import MEMORY_RATIO_TARGET, STEP_RATIO_TARGET, SVD_SPEEDUP_TARGET


def targets(result: dict) -> list[dict]:
    """Pass/fail of each target of issue 4 for one result (None = not measured / not applicable)."""
    st, su, mem = result["steps"], result["setup"], result["memory"]
    lora_step = st["lora_median_s"]
    rows = [
        {
            "target": f"step time ratio (paired median) <= {STEP_RATIO_TARGET}",
            "value": st["ratio_paired"],
            "pass": st["ratio_paired"] <= STEP_RATIO_TARGET,
        },
        {
            "target": f"step time ratio (median / median) <= {STEP_RATIO_TARGET}",
            "value": st["ratio_median"],
            "pass": st["ratio_median"] <= STEP_RATIO_TARGET,
        },
        {
            "target": f"step time ratio, switches amortized <= {STEP_RATIO_TARGET}",
            "value": st["ratio_amortized"],
            "pass": st["ratio_amortized"] <= STEP_RATIO_TARGET,
        },
        {
            "target": "switch (controller.step at a switch) < one LoRA step",
            "value": st["switch_hook_max_s"] / lora_step,
            "pass": (st["switch_hook_max_s"] < lora_step) if st["switches_timed"] else None,
        },
    ]
    prof = st.get("switch_profile")
    if prof and prof["switches"]:
        rows.append(
            {
                "target": "every later switch, to the last direction, < one LoRA step",
                "value": prof["max_s"] / lora_step,
                "pass": prof["max_s"] < lora_step,
            }
        )
    rows += [
        {
            "target": f"peak memory <= {MEMORY_RATIO_TARGET} x LoRA + SVD cache",
            "value": mem["ratio"] if mem else None,
            "pass": mem["pass"] if mem else None,
        },
        {
            "target": f"peak memory <= {MEMORY_RATIO_TARGET} x LoRA + SVD cache + fused ledger",
            "value": mem["ratio"] if mem else None,
            "pass": mem["pass_with_ledger"] if mem else None,
        },
    ]
    gpu_1b = result["shape"]["name"] == "llama-1b"
    rows.append(
        {
            "target": f"SVD set-up >= {SVD_SPEEDUP_TARGET:g}x faster than PEFT exact PiSSA"
            + ("" if gpu_1b else " (target set for llama-1b; informative here)"),
            "value": su["srlora_svd_speedup_vs_pissa_exact"],
            "pass": (su["srlora_svd_speedup_vs_pissa_exact"] >= SVD_SPEEDUP_TARGET)
            if gpu_1b
            else None,
        }
    )
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
    return (
        "subspace sin-angle of top r / top k/2 / top k; median per-direction cos; "
        "rel. sigma error; residual excess"
    )


def _acc(a: dict) -> str:
    return (
        f"{a['subspace_error_r_max']:.1e} / {a['subspace_error_half_max']:.1e} / "
        f"{a['subspace_error_max']:.2f}; {a['direction_cos_median_min']:.4f}; "
        f"{a['sv_rel_error_max']:.1e}; {a['residual_excess_max']:.1e}"
    )


def format_report(result: dict) -> str:
    """The result as a markdown table (and the targets' pass/fail)."""
    s, st, su, svd, mem = (
        result["shape"],
        result["steps"],
        result["setup"],
        result["svd"],
        result["memory"],
    )
    m = result["machine"]
    o = result["options"]
    state = (
        ""
        if o.get("offload", "cpu") == "cpu" and o.get("half_fusion") == "residual"
        else f"; SRLoRA state on {o.get('offload')}, half_fusion={o.get('half_fusion')}"
    )
    if o.get("fusion", "weight") != "weight":
        state += f"; fusion={o['fusion']}"
    lines = [
        f"### srlora bench: {s['name']} ({result['modules']} adapted modules, r={s['r']}, "
        f"r_target={s['r_target']}, batch {s['batch']}x{s['seq']}, {s['dtype']}, "
        f"{result['options']['device']}{state})",
        f"machine: {m.get('gpu', m['cpu'])}, {m['cpu_count']} CPUs, {m['threads']} torch "
        f"threads, torch {m['torch']}, peft {m.get('peft')}, transformers "
        f"{m.get('transformers')}",
        "",
        "| what | PEFT LoRA | SRLoRA | ratio |",
        "|---|---|---|---|",
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
        f" | {_fmt(st['switch_hook_max_s'] / st['lora_median_s'], 'x')} of a LoRA step |",
    ]
    prof = st.get("switch_profile")
    if prof and prof["switches"]:
        lines.append(
            f"| the {prof['switches']} later switch_now() calls, to the last direction: "
            f"first / median / last / max | - | {_fmt(prof['first_s'], 'ms')} / "
            f"{_fmt(prof['median_s'], 'ms')} / {_fmt(prof['last_s'], 'ms')} / "
            f"{_fmt(prof['max_s'], 'ms')} | {_fmt(prof['max_s'] / st['lora_median_s'], 'x')}"
            f" of a LoRA step (max) |"
        )
    lines += [
        f"| adapter set-up: PEFT LoRA init / srlora.wrap | "
        f"{_fmt(su['peft_lora_init_s'], 's')} | {_fmt(su['srlora_wrap_s'], 's')} | - |",
        f"| PEFT PiSSA init exact / niter 4 (vs srlora.wrap) | "
        f"{_fmt(su['peft_pissa_exact_init_s'], 's')} / "
        f"{_fmt(su['peft_pissa_niter4_init_s'], 's')} | {_fmt(su['srlora_wrap_s'], 's')} |"
        f" {_fmt(su['srlora_svd_speedup_vs_pissa_exact'], 'x')} faster than exact |",
    ]
    if "srlora_wrap_unbatched_s" in su:
        lines.append(
            f"| srlora.wrap variants: one SVD call per module / small solver "
            f"{su['small_solver']['other']} instead of {su['small_solver']['default']} | "
            f"- | {_fmt(su['srlora_wrap_unbatched_s'], 's')} / "
            f"{_fmt(su['srlora_wrap_other_solver_s'], 's')} | - |"
        )
    lines += [
        f"| SVD of one matrix: full torch.linalg.svd / srlora top-{svd['k']} "
        f"({svd['method']}), median | {_fmt(svd['full_svd_median_s'], 'ms')} | "
        f"{_fmt(svd['srlora_svd_median_s'], 'ms')} | - |",
        f"| SVD accuracy, random weights, worst of {svd['matrices']}: {_acc_cols()} | - |"
        f" {_acc(svd)} | - |",
    ]
    pre = result.get("svd_pretrained_minilm")
    if pre:
        lines.append(
            f"| same, real all-MiniLM-L6-v2 query/value weights ({pre['matrices']}) | - "
            f"| {_acc(pre)} | - |"
        )
    if mem:
        lines.append(
            f"| peak memory ({mem['measure']}) | {_fmt(mem['lora_peak_bytes'], 'MiB')}"
            f" | {_fmt(mem['srlora_peak_bytes'], 'MiB')} | {_fmt(mem['ratio'], 'x')} "
            f"(allowed {_fmt(mem['allowed_bytes'], 'MiB')}: 1.03x + SVD cache "
            f"{_fmt(mem['svd_cache_bytes'], 'MiB')}; ledger "
            f"{_fmt(mem['ledger_bytes'], 'MiB')}) |"
        )
        if mem.get("full_peak_bytes") is not None:
            lines.append(
                f"| peak memory of full fine-tuning (every weight, AdamW), the "
                f"yardstick | {_fmt(mem['lora_peak_bytes'], 'MiB')} | "
                f"{_fmt(mem['full_peak_bytes'], 'MiB')} (full) | "
                f"{_fmt(mem['full_ratio'], 'x')} LoRA's |"
            )
    lines += ["", "| target | value | result |", "|---|---|---|"]
    for t in result["targets"]:
        res = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {res} |")
    return "\n".join(lines)
