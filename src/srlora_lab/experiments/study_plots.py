"""The study's PNGs (matplotlib, Agg): per task, the curves of the final runs; one forest plot.

curves-<task>.png  validation loss and held-out (test subset) loss against steps, one line per
                   method at its chosen lr: the mean over the final seeds, the band +-1 standard
                   deviation over seeds (so a flat tail shows whether a method has plateaued)
forest.png         every verdict's paired difference a - b with its 95% interval, in units of
                   its margin (the dashed lines at +-1 are the margins), one panel per task
"""

from __future__ import annotations

import json
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _final_records(summary: dict, out: str, task: dict) -> dict:
    """method -> full records of its final runs at the chosen lr (read from the run files)."""
    sel = summary["lr_selection"]["tasks"].get(task["name"], {})
    seeds = set(summary["spec"]["final"]["seeds"])
    groups: dict = {}
    for r in summary["runs"]:
        s = sel.get(r["name"])
        if (
            r["task"] != task["name"]
            or r.get("failed")
            or not s
            or r["lr"] != s["chosen"]
            or r["steps"] != task["steps"]
            or r["seed"] not in seeds
        ):
            continue
        with open(os.path.join(out, r["file"])) as f:
            groups.setdefault(r["name"], []).append(json.load(f))
    return groups


def _band(ax, groups: dict, key: str, field: str, band_label: bool) -> None:
    for k, (method, recs) in enumerate(sorted(groups.items())):
        curves = [[c[field] for c in r.get(key) or []] for r in recs]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        y = np.array([c[:n] for c in curves], dtype=float)
        x = [c["step"] for c in recs[0][key][:n]]
        (line,) = ax.plot(
            x, y.mean(0), marker=".", label=f"{method} (lr {recs[0]['lr']:g}, {len(recs)} seeds)"
        )
        if len(recs) > 1:
            sd = y.std(0, ddof=1)
            ax.fill_between(
                x,
                y.mean(0) - sd,
                y.mean(0) + sd,
                color=line.get_color(),
                alpha=0.15,
                label="±1 s.d. over seeds" if band_label and k == 0 else None,
            )


def plot_curves(summary: dict, out: str, task: dict, path: str) -> bool:
    groups = _final_records(summary, out, task)
    if not groups:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "val_curve", "validation loss"),
        (axes[1], "eval_curve", "held-out loss (test subset)"),
    ):
        _band(ax, groups, key, "loss", ax is axes[0])
        ax.axvline(
            0.25 * task["steps"],
            color="gray",
            ls=":",
            lw=1,
            label="25% of steps" if ax is axes[0] else None,
        )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{task['name']}: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_forest(summary: dict, path: str) -> bool:
    tasks = [
        t["name"]
        for t in summary["spec"]["tasks"]
        if any(v["task"] == t["name"] for v in summary["verdicts"])
    ]
    if not tasks:
        return False
    plt = _plt()
    rows = {t: [v for v in summary["verdicts"] if v["task"] == t] for t in tasks}
    height = sum(len(r) for r in rows.values()) * 0.28 + 1.2 * len(tasks)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, max(3.0, height)), squeeze=False)
    colors = {
        "better": "tab:green",
        "worse": "tab:red",
        "equivalent": "tab:blue",
        "inconclusive": "gray",
    }
    for ax, t in zip(axes[:, 0], tasks):
        vs = rows[t]
        for i, v in enumerate(vs):
            m = v["margin"] or 1.0
            lo, hi = np.clip([v["ci_low"] / m, v["ci_high"] / m], -6, 6)
            ax.plot([lo, hi], [i, i], color=colors[v["verdict"]], lw=2)
            ax.plot(
                float(np.clip(v["mean_diff"] / m, -6, 6)), i, "o", color=colors[v["verdict"]], ms=4
            )
        ax.set_yticks(range(len(vs)))
        ax.set_yticklabels(
            [f"{v['metric']}: {v['a']} - {v['b']} (n={v['n']})" for v in vs], fontsize=7
        )
        ax.axvline(0, color="black", lw=0.8)
        for s in (-1, 1):
            ax.axvline(s, color="black", ls="--", lw=0.8)
        ax.set_xlim(-6.2, 6.2)
        ax.invert_yaxis()
        ax.set_title(
            f"{t}: paired difference / margin, 95% interval "
            "(green better, red worse, blue equivalent; clipped at ±6)",
            fontsize=8,
        )
    axes[-1, 0].set_xlabel(
        "(a - b) in units of the margin; dashed: ±margin. For losses, negative is better for a"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(summary: dict, out: str) -> list[str]:
    paths = []
    for t in summary["spec"]["tasks"]:
        p = os.path.join(out, f"curves-{t['name']}.png")
        if plot_curves(summary, out, t, p):
            paths.append(p)
    p = os.path.join(out, "forest.png")
    if plot_forest(summary, p):
        paths.append(p)
    return paths
