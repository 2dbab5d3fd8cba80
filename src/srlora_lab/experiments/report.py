"""Numbers and the printed table from results.json: means with 95% t-intervals over seeds.

Metrics per run:
  final accuracy      test accuracy at the last step
  loss AUC            mean training loss over all optimizer steps (area under the loss curve
                      divided by the number of steps; lower = converged faster and further)
  steps to threshold  first optimizer step at which the smoothed training loss (trailing mean
                      over ``window`` steps) falls to the threshold; the default threshold is the
                      highest final smoothed loss among the compared runs, so every run reaches it
  wall time           seconds for the whole run (set-up, training, evaluation); reported as the
                      median and range over seeds, not a t-interval: on a shared machine one
                      slow run skews it, and no mean interval of a skewed quantity is honest

Paired differences against LoRA (``paired_vs_lora``): for each other method at its selected lr
and each metric, the per-seed difference method - LoRA on the seeds every method shares, its mean
and 95% paired t-interval (``stats.paired_interval``). Seeds share data order, head init and
dropout draws, so pairing removes the seed-to-seed spread the per-method intervals carry.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .stats import paired_interval

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: normal 1.96 approx.)
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= 30 else 1.96 + 2.4 / df  # within 0.002 of exact for df > 30


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan half-width for a single value)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def median_range(values) -> tuple[float, float, float]:
    """(median, min, max); nan for no values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    return float(np.median(v)), float(v.min()), float(v.max())


def smooth(losses, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (shorter at the start)."""
    x = np.asarray(losses, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def loss_auc(losses) -> float:
    return float(np.mean(losses))


def steps_to(losses, threshold: float, window: int) -> Optional[int]:
    """First 1-based optimizer step whose smoothed loss is <= threshold, or None."""
    hit = np.nonzero(smooth(losses, window) <= threshold)[0]
    return int(hit[0]) + 1 if len(hit) else None


def default_window(steps: int) -> int:
    return max(1, steps // 20)


def default_threshold(runs: list[dict], window: int) -> float:
    return float(max(smooth(r["train_loss"], window)[-1] for r in runs))


def summarize(runs: list[dict], threshold: Optional[float] = None) -> dict:
    """Per (method, lr): accuracy, loss AUC and steps to threshold as mean and 95% half-width
    over seeds; wall time as (median, min, max)."""
    if not runs:
        return {"rows": [], "threshold": None, "window": None}
    window = default_window(max(len(r["train_loss"]) for r in runs))
    if threshold is None:
        threshold = default_threshold(runs, window)
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    rows = []
    for (method, lr), rs in groups.items():
        reach = [steps_to(r["train_loss"], threshold, window) for r in rs]
        rows.append(
            {
                "method": method,
                "lr": lr,
                "seeds": [r["seed"] for r in rs],
                "accuracy": mean_ci([r["final_accuracy"] for r in rs]),
                "test_loss": mean_ci(
                    [r["final_test_loss"] for r in rs if r.get("final_test_loss") is not None]
                ),
                "perplexity": mean_ci(
                    [r["final_perplexity"] for r in rs if r.get("final_perplexity") is not None]
                ),
                "val_accuracy": mean_ci(
                    [r["val_accuracy"] for r in rs if r.get("val_accuracy") is not None]
                ),
                "loss_auc": mean_ci([loss_auc(r["train_loss"]) for r in rs]),
                "steps_to_threshold": mean_ci([s for s in reach if s is not None]),
                "reached": sum(s is not None for s in reach),
                "wall_time_s": median_range([r["wall_time_s"] for r in rs]),
                "switches": float(np.mean([r["num_switches"] for r in rs])),
            }
        )
    return {"rows": rows, "threshold": threshold, "window": window}


# metric key -> (per-run value, or None where the run has none)
_PAIRED = {
    "accuracy": lambda r, thr, w: r["final_accuracy"],
    "test_loss": lambda r, thr, w: r.get("final_test_loss"),
    "perplexity": lambda r, thr, w: r.get("final_perplexity"),
    "val_accuracy": lambda r, thr, w: r.get("val_accuracy"),
    "loss_auc": lambda r, thr, w: loss_auc(r["train_loss"]),
    "steps_to_threshold": lambda r, thr, w: steps_to(r["train_loss"], thr, w),
    "wall_time_s": lambda r, thr, w: r["wall_time_s"],
}


def paired_vs_lora(
    results: dict, threshold: Optional[float] = None, reference: str = "lora"
) -> Optional[dict]:
    """Per method other than ``reference``, at each method's selected lr: for every metric the
    per-seed difference (method - reference) over the seeds all methods share, as
    ``stats.paired_interval`` gives it (n, mean_diff, sd, ci_low, ci_high at 95%). A metric a run
    lacks (no validation without an lr grid; threshold not reached) drops that seed's pair.
    None without a reference run."""
    runs = results["runs"]
    best = results.get("best_lr") or {}
    at_best = {}
    for r in runs:
        if best.get(r["method"], r["lr"]) == r["lr"]:
            at_best.setdefault(r["method"], {})[r["seed"]] = r
    if reference not in at_best or len(at_best) < 2:
        return None
    seeds = sorted(set.intersection(*(set(v) for v in at_best.values())))
    window = default_window(max(len(r["train_loss"]) for r in runs))
    if threshold is None:
        threshold = default_threshold(runs, window)
    out = {
        "reference": reference,
        "seeds": seeds,
        "conf": 0.95,
        "threshold": threshold,
        "window": window,
        "methods": {},
    }
    for method, by_seed in at_best.items():
        if method == reference:
            continue
        entry = {"lr": by_seed[seeds[0]]["lr"] if seeds else None}
        for key, value in _PAIRED.items():
            pairs = [
                (
                    value(by_seed[s], threshold, window),
                    value(at_best[reference][s], threshold, window),
                )
                for s in seeds
            ]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            entry[key] = (
                _json_safe(paired_interval([a for a, _ in pairs], [b for _, b in pairs], conf=0.95))
                if pairs
                else None
            )
        out["methods"][method] = entry
    return out


def _json_safe(p: dict) -> dict:
    """One pair gives an unbounded interval and no sd: stored as null (strict JSON)."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in p.items()}


PAIRED_METRICS = ("accuracy", "test_loss", "perplexity", "val_accuracy", "loss_auc")


def distinguishable(paired: dict) -> bool:
    """Whether any method's paired interval against LoRA excludes zero on a quality metric
    (accuracy, test loss, perplexity, validation accuracy, loss AUC; not wall time)."""
    for e in paired["methods"].values():
        for k in PAIRED_METRICS:
            iv = e.get(k)
            if (
                iv
                and iv.get("ci_low") is not None
                and iv.get("ci_high") is not None
                and (iv["ci_low"] > 0 or iv["ci_high"] < 0)
            ):
                return True
    return False


def cfg_steps(results: dict):
    return results.get("config", {}).get("steps", "?")


def _fmt_paired(p, scale=1.0, digits=1) -> str:
    if p is None:
        return "-"
    m = f"{p['mean_diff'] * scale:+.{digits}f}"
    if p["n"] < 2:
        return f"{m} (1 seed)"
    return f"{m} [{p['ci_low'] * scale:+.{digits}f}, {p['ci_high'] * scale:+.{digits}f}]"


def _paired_table(paired: dict, order: dict) -> str:
    head = [
        "method",
        "lr",
        "test acc pp",
        "test loss",
        "test ppl",
        "val acc pp",
        "loss AUC",
        "steps to thr",
        "wall s",
    ]
    lines = []
    for method in sorted(paired["methods"], key=lambda m: order.get(m, 99)):
        e = paired["methods"][method]
        lines.append(
            [
                method,
                f"{e['lr']:g}" if e["lr"] is not None else "-",
                _fmt_paired(e["accuracy"], 100),
                _fmt_paired(e.get("test_loss"), 1, 4),
                _fmt_paired(e.get("perplexity"), 1, 2),
                _fmt_paired(e["val_accuracy"], 100),
                _fmt_paired(e["loss_auc"], 1, 3),
                _fmt_paired(e["steps_to_threshold"], 1, 0),
                _fmt_paired(e["wall_time_s"], 1, 1),
            ]
        )
    for col, key in ((5, "val_accuracy"), (4, "perplexity")):  # columns no run has
        if all(paired["methods"][m].get(key) is None for m in paired["methods"]):
            head.pop(col)
            for l in lines:
                l.pop(col)
    return _align(head, lines)


def _align(head: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def _fmt_range(mr, digits=1) -> str:
    med, lo, hi = mr
    if not math.isfinite(med):
        return "-"
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _fmt(mc, scale=1.0, digits=1) -> str:
    m, h = mc
    if not math.isfinite(m):
        return "-"
    s = f"{m * scale:.{digits}f}"
    return s + (f" ± {h * scale:.{digits}f}" if math.isfinite(h) else "")


def _table(rows: list[dict]) -> str:
    head = [
        "method",
        "lr",
        "test acc %",
        "test loss",
        "test ppl",
        "val acc %",
        "loss AUC",
        "steps to thr",
        "wall s: median (range)",
        "seeds",
    ]
    lines = []
    nan = (float("nan"), float("nan"))
    for r in rows:
        reach = _fmt(r["steps_to_threshold"], 1, 0)
        if r["reached"] < len(r["seeds"]):
            reach += f" ({r['reached']}/{len(r['seeds'])} reached)"
        lines.append(
            [
                r["method"],
                f"{r['lr']:g}",
                _fmt(r["accuracy"], 100),
                _fmt(r.get("test_loss", nan), 1, 4),
                _fmt(r.get("perplexity", nan), 1, 2),
                _fmt(r["val_accuracy"], 100),
                _fmt(r["loss_auc"], 1, 3),
                reach,
                _fmt_range(r["wall_time_s"]),
                str(len(r["seeds"])),
            ]
        )
    # columns no run has: validation (no lr grid), perplexity (not a causal LM), test loss
    for col, key in ((5, "val_accuracy"), (4, "perplexity"), (3, "test_loss")):
        if all(not math.isfinite(r.get(key, nan)[0]) for r in rows):
            head.pop(col)
            for l in lines:
                l.pop(col)
    return _align(head, lines)


def format_report(results: dict, threshold: Optional[float] = None) -> str:
    """The printed report: each method at its best lr, then the full lr grid if there is one."""
    runs = results["runs"]
    if not runs:
        return "no finished runs"
    summ = summarize(runs, threshold)
    best = results.get("best_lr") or {}
    order = {m: i for i, m in enumerate(results.get("config", {}).get("methods", []))}
    rows = sorted(summ["rows"], key=lambda r: (order.get(r["method"], 99), r["lr"]))
    best_rows = [r for r in rows if best.get(r["method"]) == r["lr"]]
    out = [
        f"{results.get('config', {}).get('task', '')}: mean ± 95% t-interval over seeds "
        "(wall time: median and range); "
        f"loss threshold {summ['threshold']:.4f} (smoothed over {summ['window']} steps)",
        _table(best_rows),
    ]
    paired = paired_vs_lora(results, summ["threshold"])
    if paired is not None and paired["methods"]:
        seeds = ",".join(str(s) for s in paired["seeds"]) or "none"
        out += [
            "",
            f"paired difference against lora (method - lora on the same seed; mean "
            f"[95% paired t-interval]; seeds {seeds}; each method at its lr above):",
            _paired_table(paired, order),
        ]
        if not distinguishable(paired):
            out += [
                "",
                f"Every paired interval holds zero: at {cfg_steps(results)} steps and "
                f"{len(paired['seeds'])} seeds the methods are not distinguishable. The "
                "longer answer (each method at its validated lr, 5+ paired seeds, "
                "corrected for multiplicity): srlora study, docs/study.md.",
            ]
    if len(rows) > len(best_rows):
        out += [
            "",
            "full learning-rate grid (best lr per method chosen on validation accuracy):",
            _table(rows),
        ]
    return "\n".join(out)
