"""``diagnostics.png``: the mechanism diagnostics of a ``srlora compare`` run set.

Three panels, from the ``diagnostics`` entry of each run record (see :mod:`.diagnostics`), each
method at its best learning rate, all seeds pooled:

1. ages of SRLoRA's fused pairs (steps from the slot's last write to its fusion), split into
   pairs inserted at the previous switch ("new") and older ones;
2. how far training moved each fused pair (||BA - B0A0|| / ||B0A0||, log scale) against the
   index of the singular direction it was initialised with;
3. the effective rank of each module's total change W_final - W0, per method (one dot per
   module and seed; the bar is the mean).
"""

from __future__ import annotations

import os

import numpy as np

from .plots import _best_groups, _plt


def plot_diagnostics(results: dict, path: str) -> bool:
    """Write the figure; returns False (and writes nothing) when no run has diagnostics."""
    groups = {m: [r for r in rs if r.get("diagnostics")] for m, rs in _best_groups(results).items()}
    groups = {m: rs for m, rs in groups.items() if rs}
    if not groups:
        return False
    plt = _plt()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    pairs = [p for r in groups.get("srlora", []) for p in r["diagnostics"]["pairs"]]
    if pairs:
        ages = np.array([p["age"] for p in pairs])
        new = np.array([p["new"] for p in pairs])
        u = np.unique(ages)  # ages are multiples of the switch interval: one bar per value
        w = max(1.0, float(np.diff(u).min()) if len(u) > 1 else 1.0, (u[-1] - u[0]) / 60)
        bins = np.arange(u[0] - w / 2, u[-1] + w, w)
        ax1.hist(
            [ages[new], ages[~new]],
            bins=bins,
            stacked=True,
            label=[f"inserted at the previous switch ({new.sum()})", f"older ({(~new).sum()})"],
        )
        ax1.legend(fontsize=7)
        sums = [r["diagnostics"]["summary"] for r in groups["srlora"]]
        ax1.set_title(
            f"SRLoRA fused pairs: age\ninserted directions that outlived the next "
            f"switch: {sum(s['survived'] for s in sums)} of "
            f"{sum(s['at_risk'] for s in sums)} ({len(sums)} run(s))",
            fontsize=9,
        )
        mv = [
            (p["dir"], p["moved"], p["new"])
            for p in pairs
            if p["moved"] is not None and p["dir"] is not None and p["moved"] > 0
        ]
        if mv:
            d, m, nw = (np.array(v) for v in zip(*mv))
            ax2.scatter(d[nw], m[nw], s=8, alpha=0.5, label="inserted at the previous switch")
            ax2.scatter(d[~nw], m[~nw], s=8, alpha=0.5, label="older")
            ax2.set_yscale("log")
            ax2.legend(fontsize=7)
    else:
        for ax in (ax1, ax2):
            ax.text(
                0.5,
                0.5,
                "no SRLoRA pair was fused",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax1.set_title("SRLoRA fused pairs: age", fontsize=9)
    ax1.set_xlabel("age at fusion (optimizer steps)")
    ax1.set_ylabel("fused pairs")
    ax2.set_xlabel("singular-direction index the slot was initialised with")
    ax2.set_ylabel("moved: |BA - B0A0|_F / |B0A0|_F")
    ax2.set_title("how far training moved each fused pair", fontsize=9)
    for k, (method, rs) in enumerate(groups.items()):
        er = [s["erank"] for r in rs for s in r["diagnostics"]["spectra"] if s["erank"] is not None]
        if not er:
            continue
        x = k + np.random.default_rng(k).uniform(-0.25, 0.25, len(er))
        ax3.scatter(x, er, s=6, alpha=0.4)
        ax3.bar(k, np.mean(er), width=0.6, alpha=0.3)
    ax3.set_xticks(range(len(groups)), [f"{m}\n(lr {rs[0]['lr']:g})" for m, rs in groups.items()])
    ax3.set_ylabel("effective rank of W_final - W0")
    ax3.set_title(
        "effective rank per module (exp of the entropy of the\nnormalised singular "
        "values, Roy & Vetterli 2007)",
        fontsize=9,
    )
    fig.suptitle(f"{results['config'].get('task', '')}: mechanism diagnostics", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, out: str) -> list[str]:
    """Write ``diagnostics.png`` into ``out`` when it applies; returns the paths written."""
    p = os.path.join(out, "diagnostics.png")
    return [p] if results.get("runs") and plot_diagnostics(results, p) else []
