"""PNG figures from results.json (matplotlib, Agg backend: no display needed).

loss.png        smoothed training loss per method (mean over seeds at its best lr, band = min..max
                over seeds, said in the plot), SRLoRA's switch steps as dotted vertical lines
accuracy.png    eval accuracy curve per method (mean over seeds, band = min..max), the same
                switch lines
importance.png  SRLoRA's switches: for each adapted module (row block) and slot (row), the pair's
                importance score at each switch (column, scaled per module and switch so the
                most important pair is 1), with the fused-and-reinitialised slots crossed
"""

from __future__ import annotations

import os

import numpy as np

from .report import default_window, smooth


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_groups(results: dict) -> dict:
    best = results.get("best_lr") or {}
    groups: dict = {}
    for r in results["runs"]:
        if best.get(r["method"], r["lr"]) == r["lr"]:
            groups.setdefault(r["method"], []).append(r)
    return groups


def _switch_lines(ax, groups: dict) -> None:
    """SRLoRA's switch steps (of its runs at the selected lr) as dotted vertical lines."""
    steps = sorted({s for rs in groups.values() for r in rs for s in r["switch_steps"]})
    for k, s in enumerate(steps):
        ax.axvline(s, color="gray", ls=":", lw=1, label="SRLoRA switch" if k == 0 else None)


def _band_note(ax, groups: dict) -> None:
    if any(len(rs) > 1 for rs in groups.values()):
        ax.text(
            0.99,
            0.01,
            "line = mean over seeds; shaded band = min..max over seeds",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="dimgray",
        )


def loss_figure(results: dict):
    plt = _plt()
    groups = _best_groups(results)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, rs in groups.items():
        n = min(len(r["train_loss"]) for r in rs)
        w = default_window(n)
        curves = np.stack([smooth(r["train_loss"][:n], w) for r in rs])
        x = np.arange(1, n + 1)
        (line,) = ax.plot(
            x, curves.mean(0), label=f"{method} (lr {rs[0]['lr']:g}, {len(rs)} seeds)"
        )
        if len(rs) > 1:
            ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    _switch_lines(ax, groups)
    _band_note(ax, groups)
    ax.set_xlabel("optimizer step")
    w = default_window(max((len(r["train_loss"]) for rs in groups.values() for r in rs), default=1))
    ax.set_ylabel(f"training loss (trailing mean over {w} steps)")
    ax.set_title(f"{results['config'].get('task', '')}: training loss")
    ax.legend()
    fig.tight_layout()
    return fig


def accuracy_figure(results: dict):
    plt = _plt()
    groups = _best_groups(results)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, rs in groups.items():
        n = min(len(r["eval_curve"]) for r in rs)
        steps = [c["step"] for c in rs[0]["eval_curve"][:n]]
        acc = np.array([[c["accuracy"] for c in r["eval_curve"][:n]] for r in rs]) * 100
        (line,) = ax.plot(
            steps,
            acc.mean(0),
            marker="o",
            ms=3,
            label=f"{method} (lr {rs[0]['lr']:g}, {len(rs)} seeds)",
        )
        if len(rs) > 1:
            ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
    _switch_lines(ax, groups)
    _band_note(ax, groups)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval accuracy (%)")
    ax.set_title(
        f"{results['config'].get('task', '')}: eval accuracy "
        f"({results['config'].get('eval_size') or 'all'} test examples)"
    )
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_loss(results: dict, path: str) -> None:
    _save(loss_figure(results), path)


def plot_accuracy(results: dict, path: str) -> None:
    _save(accuracy_figure(results), path)


def importance_grid(switches: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(module names, scores [rows=module*slot, cols=switch], fused mask) from one run's log."""
    names = []
    for e in switches:
        for m in e["modules"]:
            if m not in names:
                names.append(m)
    r = max((len(s) for e in switches for s in e["scores"]), default=0)
    grid = np.full((len(names) * r, len(switches)), np.nan)
    fused = np.zeros_like(grid, dtype=bool)
    for j, e in enumerate(switches):
        for m, slots, scores in zip(e["modules"], e["slots"], e["scores"]):
            i = names.index(m) * r
            s = np.asarray(scores, dtype=float)
            grid[i : i + len(s), j] = s / s.max() if s.max() > 0 else s
            fused[[i + k for k in slots], j] = True
    return names, grid, fused


def plot_importance(results: dict, path: str) -> bool:
    """Returns False (and writes nothing) when no SRLoRA run switched."""
    rs = _best_groups(results).get("srlora") or [
        r for r in results["runs"] if r["method"] == "srlora"
    ]
    rs = [r for r in rs if r.get("switches")]
    if not rs:
        return False
    run = rs[0]
    names, grid, fused = importance_grid(run["switches"])
    r = grid.shape[0] // max(1, len(names))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * grid.shape[1], 2 + 0.09 * grid.shape[0]))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    yy, xx = np.nonzero(fused)
    ax.scatter(xx, yy, marker="x", color="red", s=12, lw=1)
    for k in range(1, len(names)):
        ax.axhline(k * r - 0.5, color="white", lw=0.6)
    parts = [n.replace("base_model.model.", "").split(".") for n in names]
    common = 0  # drop the dotted prefix every module shares (e.g. "bert.encoder.")
    while len(parts) > 1 and all(
        len(p) > common + 1 and p[common] == parts[0][common] for p in parts
    ):
        common += 1
    short = [".".join(p[common:]) for p in parts]
    ax.set_yticks([k * r + (r - 1) / 2 for k in range(len(names))], short, fontsize=6)
    ax.set_xticks(range(grid.shape[1]), [str(e["step"]) for e in run["switches"]], fontsize=7)
    ax.set_xlabel("switch at optimizer step")
    ax.set_title(
        f"SRLoRA pair importance at each switch (seed {run['seed']}, lr {run['lr']:g});"
        "\nx = pair fused into the weight and reinitialised",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="importance / module max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict, out: str) -> list[str]:
    """Write every figure that applies; returns the paths written."""
    if not results["runs"]:
        return []
    paths = []
    for name, fn in (
        ("loss.png", plot_loss),
        ("accuracy.png", plot_accuracy),
        ("importance.png", plot_importance),
    ):
        p = os.path.join(out, name)
        if fn(results, p) is not False:
            paths.append(p)
    return paths
