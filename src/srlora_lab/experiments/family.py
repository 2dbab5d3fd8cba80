"""What a study declared before its runs, read after them: the confirmatory family with Holm's
correction, and the headroom that full fine-tuning leaves above LoRA.

Pure functions over the verdict entries and per-seed values (no torch).

- **Confirmatory**: the spec's ``confirmatory`` list names (task, a, b, metric) comparisons and a
  prediction for each, committed before the first run. Each gets the paired t-test's two-sided
  p value and Holm's adjusted p over that family; a difference counts as found when the adjusted
  p is below 0.05. Every other verdict of the study is exploratory.
- **Headroom**: per task, ``H = full - LoRA(r)`` on a metric, paired over seeds made on one
  machine, and for each method the fraction of it recovered, ``(method - LoRA(r)) / H``, with a
  paired percentile-bootstrap interval over the seeds (stats.bootstrap_ratio). The fraction is
  only defined where full fine-tuning is ahead of LoRA (H's 95% interval excludes zero on the
  better side); elsewhere it is None with the reason, never a ratio over noise.
"""

from __future__ import annotations

from typing import Callable, Optional

from .stats import bootstrap_ratio, holm, paired_interval, paired_p
from .study_verdicts import metric_info

ALPHA = 0.05


def _find(verdicts: list[dict], task: str, a: str, b: str, metric: str) -> Optional[dict]:
    """The verdict entry of (a, b) on ``metric`` in ``task``, read from a's side."""
    for v in verdicts:
        if v["task"] == task and v["metric"] == metric and (v["a"], v["b"]) == (a, b):
            return v
    for v in verdicts:
        if v["task"] == task and v["metric"] == metric and (v["a"], v["b"]) == (b, a):
            flip = {"better": "worse", "worse": "better"}
            return {
                **v,
                "a": a,
                "b": b,
                "mean_a": v["mean_b"],
                "mean_b": v["mean_a"],
                "mean_diff": -v["mean_diff"],
                "ci_low": -v["ci_high"],
                "ci_high": -v["ci_low"],
                "verdict": flip.get(v["verdict"], v["verdict"]),
            }
    return None


def confirmatory(declared: list[dict], verdicts: list[dict]) -> list[dict]:
    """The declared family, each with its verdict entry's numbers, ``p`` and ``p_holm``, and
    ``finding``: better / worse when ``p_holm < 0.05`` (a's side), else "no difference shown"
    ("pending" while the comparison has no complete data)."""
    rows = []
    for d in declared:
        v = _find(verdicts, d["task"], d["a"], d["b"], d["metric"])
        row = {**d, "n": None, "mean_diff": None, "ci_low": None, "ci_high": None, "p": None}
        if v is not None and v.get("complete"):
            row.update(
                {
                    k: v.get(k)
                    for k in (
                        "n",
                        "mean_a",
                        "mean_b",
                        "mean_diff",
                        "ci_low",
                        "ci_high",
                        "p",
                        "higher_is_better",
                        "verdict",
                    )
                }
            )
        rows.append(row)
    ps = [r["p"] if r["p"] is not None else float("nan") for r in rows]
    for r, adj in zip(rows, holm(ps)):
        if r["p"] is None:
            measured = any(
                v["task"] == r["task"]
                and {v["a"], v["b"]} == {r["a"], r["b"]}
                and v.get("complete")
                for v in verdicts
            )
            # the pair is complete on other metrics: no run records this one (it never will)
            r.update(
                p_holm=None,
                finding=f"not measured: no run records {r['metric']!r}" if measured else "pending",
            )
            continue
        r["p_holm"] = adj
        if adj < ALPHA:
            good = (r["mean_diff"] > 0) == bool(r["higher_is_better"])
            r["finding"] = "better" if good else "worse"
        else:
            r["finding"] = "no difference shown"
    return rows


Values = Callable[[str, str], dict]  # (method, metric) -> {seed: (value, fingerprint id)}


def _paired(*series: dict) -> list:
    """Seeds present in every series with one fingerprint across them, sorted."""
    common = set.intersection(*(set(s) for s in series))
    return sorted(s for s in common if len({x[s][1] for x in series}) == 1)


def full_ahead(H: dict, metric: str) -> bool:
    """Whether the interval of ``H = full - LoRA`` shows full fine-tuning ahead: above zero for
    a higher-is-better metric, below zero for a loss. Only then is there a headroom to recover."""
    higher, _ = metric_info(metric)
    return bool(H["ci_low"] > 0) if higher else bool(H["ci_high"] < 0)


def headroom(task: str, spec: dict, values: Values) -> Optional[dict]:
    """The headroom entry of one task: ``spec`` is ``{full, lora, methods, metrics}``. None when
    the task has no paired full and LoRA runs yet."""
    out = {"task": task, "full": spec["full"], "lora": spec["lora"], "metrics": {}}
    for metric in spec.get("metrics") or ["final_test_loss", "final_accuracy"]:
        full, lora = values(spec["full"], metric), values(spec["lora"], metric)
        seeds = _paired(full, lora)
        if len(seeds) < 2:
            continue
        hf = [full[s][0] for s in seeds]
        hl = [lora[s][0] for s in seeds]
        H = {**paired_interval(hf, hl), "p": paired_p(hf, hl), "seeds": seeds}
        H["full_ahead"] = full_ahead(H, metric)
        rows = []
        for m in spec.get("methods") or []:
            vm = values(m, metric)
            ms = _paired(full, lora, vm)
            if len(ms) < 2:
                rows.append({"method": m, "n": len(ms)})
                continue
            num = [vm[s][0] - lora[s][0] for s in ms]
            den = [full[s][0] - lora[s][0] for s in ms]
            rows.append(
                {
                    "method": m,
                    "n": len(ms),
                    "vs_lora": {
                        **paired_interval([vm[s][0] for s in ms], [lora[s][0] for s in ms]),
                        "p": paired_p([vm[s][0] for s in ms], [lora[s][0] for s in ms]),
                    },
                    "fraction": bootstrap_ratio(num, den) if H["full_ahead"] else None,
                }
            )
        out["metrics"][metric] = {"H": H, "methods": rows}
    return out if out["metrics"] else None
