"""The one-picture answer over every committed study: per task, how each method's held-out test
loss compares with LoRA's at the same rank, with its paired interval, and full fine-tuning (the
headroom) where it was measured.

Pure reading of ``study.json`` files (no training): :func:`collect` picks, per task, the first
study (in the order given) that pairs each method with LoRA on ``final_test_loss``; the figure
shows ``(method - LoRA) / mean LoRA`` in percent, so tasks with different loss scales share an
axis (lower is better: left of 0 beats LoRA). :func:`figure` draws it; ``srlora summary`` writes
it (docs/figures/summary.png).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

# what the figure shows, in this order (by the method's name in its study)
SHOWN = (
    ("full", "full fine-tuning"),
    ("pissa", "PiSSA"),
    ("srlora", "SRLoRA (paper)"),
    ("srlora-rewarm", "SRLoRA, rewarm"),
)
METRIC = "final_test_loss"


def _against_lora(v: dict) -> dict | None:
    """A verdict entry read as (method - lora), or None when neither side is ``lora``."""
    if v["b"] == "lora":
        return {
            "method": v["a"],
            "mean": v["mean_diff"],
            "lo": v["ci_low"],
            "hi": v["ci_high"],
            "lora": v["mean_b"],
            "n": v["n"],
            "mixed": bool(v.get("mixed_sessions")),
        }
    if v["a"] == "lora":
        return {
            "method": v["b"],
            "mean": -v["mean_diff"],
            "lo": -v["ci_high"],
            "hi": -v["ci_low"],
            "lora": v["mean_a"],
            "n": v["n"],
            "mixed": bool(v.get("mixed_sessions")),
        }
    return None


def collect(study_dirs: Iterable[str]) -> dict:
    """{task: {method: {mean, lo, hi (percent of LoRA's mean loss), n, study, mixed}}}."""
    names = dict(SHOWN)
    out: dict = {}
    for d in study_dirs:
        path = os.path.join(d, "study.json")
        try:
            _collect_one(path, os.path.basename(os.path.normpath(d)), names, out)
        except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
            why = str(e).splitlines()[0] if isinstance(e, ValueError) else repr(e)
            raise ValueError(f"{path}: damaged or not a study's summary ({why})") from None
    return out


def _collect_one(path: str, study: str, names: dict, out: dict) -> None:
    """Add one study.json's complete verdicts against LoRA to ``out`` (see :func:`collect`)."""
    with open(path) as f:
        s = json.load(f)
    for v in s.get("verdicts", []):
        if v["metric"] != METRIC or not v.get("complete"):
            continue
        e = _against_lora(v)
        if e is None or e["method"] not in names:
            continue
        cell = out.setdefault(v["task"], {})
        if e["method"] in cell:
            continue  # the first study given wins
        scale = 100.0 / e["lora"]
        cell[e["method"]] = {
            "mean": e["mean"] * scale,
            "lo": e["lo"] * scale,
            "hi": e["hi"] * scale,
            "n": e["n"],
            "mixed": e["mixed"],
            "study": study,
        }


def figure(data: dict, path: str, title: str = "") -> str:
    """Tasks as rows, methods as markers with their 95% paired intervals; writes ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(data, key=lambda t: (-("full" in data[t]), t))
    shown = [(m, label) for m, label in SHOWN if any(m in data[t] for t in tasks)]
    colors = {
        "full": "black",
        "pissa": "tab:blue",
        "srlora": "tab:red",
        "srlora-rewarm": "tab:orange",
    }
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(tasks) + 1.6))
    step = 0.8 / max(1, len(shown))
    for i, t in enumerate(tasks):
        for k, (m, label) in enumerate(shown):
            e = data[t].get(m)
            if e is None:
                continue
            y = i - 0.4 + step * (k + 0.5)
            ax.errorbar(
                e["mean"],
                y,
                xerr=[[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]],
                fmt="o",
                color=colors.get(m, "gray"),
                capsize=2,
                ms=4,
                mfc="white" if e["mixed"] else colors.get(m, "gray"),
                label=label
                if i == next(j for j, tt in enumerate(tasks) if m in data[tt])
                else None,
            )
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.invert_yaxis()
    ax.set_xlabel(
        "test loss against LoRA at the same rank, % of LoRA's (95% paired CI; left "
        "is better; hollow: the two sides ran in different sessions)",
        fontsize=7,
    )
    ax.set_title(title or "Each method against LoRA, per task", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
