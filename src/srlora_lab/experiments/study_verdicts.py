"""From run records to verdicts: the metrics, the paired verdict rules and the paper's claims.

Pure functions over dicts (no torch). Conventions (docs/study.md):
- accuracies are in percentage points (the record's fraction x 100); losses as recorded;
- a verdict compares method ``a`` with method ``b`` seed by seed, ``mean_diff = a - b``, with
  the 95% paired t-interval of ``stats.paired_interval``;
- "better" means a is better than b: the interval excludes 0 on a's good side (above 0 for an
  accuracy, below 0 for a loss); "worse" the other side; "equivalent" the whole interval lies
  inside [-margin, +margin]; otherwise "inconclusive". A difference that excludes 0 wins over
  equivalence (``within_margin`` then says it is smaller than the margin).
- the margin is ``margins.accuracy`` points for accuracies and ``margins.loss_rel`` times the
  mean of both methods' values for losses and perplexities.
"""

from __future__ import annotations

import math
from typing import Optional

from .stats import paired_interval, paired_p, t_quantile

EARLY_FRAC = 0.25
# metric -> (higher is better, kind of margin); other metrics found in a record: lower, loss
METRICS = {
    "final_accuracy": (True, "accuracy"),
    "final_test_loss": (False, "loss"),
    "val_loss": (False, "loss"),
    "train_auc25": (False, "loss"),
    "early_test_loss": (False, "loss"),
}
SEEDS_CAP = 100_000
_FLIP = {"better": "worse", "worse": "better"}  # a verdict read from the other side of its pair


def train_auc(losses: list[float], frac: float = EARLY_FRAC) -> Optional[float]:
    """Mean training loss over the first ``ceil(frac * steps)`` steps (the area under the loss
    curve there, divided by its width)."""
    if not losses:
        return None
    k = max(1, math.ceil(frac * len(losses)))
    return sum(losses[:k]) / k


def early_point(curve: list[dict], steps: int, frac: float = EARLY_FRAC) -> Optional[dict]:
    """The eval-curve point nearest ``frac * steps`` (ties: the earlier one)."""
    if not curve:
        return None
    target = frac * steps
    return min(curve, key=lambda c: (abs(c["step"] - target), c["step"]))


def metrics_of(rec: dict) -> dict:
    """The study's metrics of one run record (accuracies in points); extra lower-is-better keys:
    any other numeric top-level key naming a perplexity or ending in ``_loss``."""
    out = {}
    if rec.get("final_accuracy") is not None:
        out["final_accuracy"] = 100.0 * rec["final_accuracy"]
    for k in ("final_test_loss", "val_loss"):
        if rec.get(k) is not None:
            out[k] = rec[k]
    auc = train_auc(rec.get("train_loss") or [])
    if auc is not None:
        out["train_auc25"] = auc
    pt = early_point(rec.get("eval_curve") or [], rec.get("steps") or 0)
    if pt is not None and pt.get("loss") is not None:
        out["early_test_loss"] = pt["loss"]
    for k, v in rec.items():
        if k in out or k in METRICS or k.startswith("train_") or isinstance(v, bool):
            continue
        if (
            isinstance(v, (int, float))
            and ("perplexity" in k or k.endswith("_loss"))
            and math.isfinite(v)
        ):
            out[k] = float(v)
    return out


def metric_info(name: str) -> tuple[bool, str]:
    """(higher is better, margin kind) of a metric; unknown ones are lower-is-better losses."""
    return METRICS.get(name, (False, "loss"))


def margin_for(name: str, a: list[float], b: list[float], margins: dict) -> float:
    higher, kind = metric_info(name)
    if kind == "accuracy":
        return margins["accuracy"]
    vals = list(a) + list(b)
    return margins["loss_rel"] * abs(sum(vals) / len(vals))


def verdict(ci_low: float, ci_high: float, margin: float, higher_is_better: bool) -> str:
    """better | worse | equivalent | inconclusive for a's minus b's interval (rules above)."""
    if ci_low > 0:
        return "better" if higher_is_better else "worse"
    if ci_high < 0:
        return "worse" if higher_is_better else "better"
    if -margin <= ci_low and ci_high <= margin:
        return "equivalent"
    return "inconclusive"


def seeds_needed(mean_diff: float, sd: float, margin: float, conf: float = 0.95) -> Optional[int]:
    """Seeds at which the observed mean and spread would give a verdict: the least n >= 2 with
    ``t_{(1+conf)/2, n-1} * sd / sqrt(n) <= h``, ``h = max(|mean|, margin - |mean|)`` (the half
    width that excludes 0, or that fits the interval inside the margin, whichever is wider).
    None without a spread estimate; capped at SEEDS_CAP."""
    if sd is None or not math.isfinite(sd):
        return None
    h = max(abs(mean_diff), margin - abs(mean_diff))
    if sd == 0:
        return 2
    if h <= 0:
        return SEEDS_CAP
    n = 2
    while n < SEEDS_CAP:
        if t_quantile(0.5 + conf / 2.0, n - 1) * sd / math.sqrt(n) <= h:
            return n
        n = n + 1 if n < 200 else int(n * 1.05) + 1
    return SEEDS_CAP


def compare(
    task: str, metric: str, a: str, b: str, va: dict, vb: dict, margins: dict, expected_n: int
) -> Optional[dict]:
    """The verdict entry for ``a`` vs ``b`` on ``metric``; ``va``/``vb`` map seed -> value.
    None when no seed has both."""
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    xa, xb = [va[s] for s in seeds], [vb[s] for s in seeds]
    iv = paired_interval(xa, xb)
    higher, _ = metric_info(metric)
    margin = margin_for(metric, xa, xb, margins)
    v = verdict(iv["ci_low"], iv["ci_high"], margin, higher) if iv["n"] >= 2 else "inconclusive"
    out = {
        "task": task,
        "metric": metric,
        "a": a,
        "b": b,
        "n": iv["n"],
        "seeds": seeds,
        "mean_a": sum(xa) / len(xa),
        "mean_b": sum(xb) / len(xb),
        "mean_diff": iv["mean_diff"],
        "sd_diff": iv["sd"],
        "ci_low": iv["ci_low"],
        "ci_high": iv["ci_high"],
        "margin": margin,
        "higher_is_better": higher,
        "p": paired_p(xa, xb),
        "verdict": v,
        "within_margin": iv["n"] >= 2 and -margin <= iv["ci_low"] and iv["ci_high"] <= margin,
        "complete": iv["n"] >= expected_n,
    }
    if v == "inconclusive":
        out["seeds_needed"] = seeds_needed(iv["mean_diff"], iv["sd"], margin)
    return out


# --------------------------------------------------------------------------- the paper's claims
TEXT_TASKS = ("rt-polarity", "rt-subjectivity", "bbc-news")
CLAIMS = [
    {
        "id": 1,
        "claim": "faster early convergence (training-loss AUC and held-out loss over the "
        "first 25% of steps)",
        "metrics": ["train_auc25", "early_test_loss"],
        "tasks": None,
        "baselines": ["lora", "pissa"],
        "expect": "better",
    },
    {
        "id": 2,
        "claim": "final accuracy at least LoRA's and PiSSA's on text classification",
        "metrics": ["final_accuracy"],
        "tasks": list(TEXT_TASKS),
        "baselines": ["lora", "pissa"],
        "expect": "at_least",
    },
    {
        "id": 3,
        "claim": "gains on the harder image task (paper: CIFAR-100 +2.45)",
        "metrics": ["final_accuracy"],
        "tasks": ["fashion-mnist"],
        "baselines": ["lora", "pissa"],
        "expect": "better",
    },
    {
        "id": 4,
        "claim": "loses on MNIST (paper: -4 points against LoRA)",
        "metrics": ["final_accuracy"],
        "tasks": ["mnist"],
        "baselines": ["lora"],
        "expect": "worse",
    },
]


def claim_outcome(expect: str, verdicts: list[str]) -> str:
    """holds | fails | inconclusive | not run, from the verdicts of subject vs each baseline."""
    if not verdicts:
        return "not run"
    if expect == "better":
        if "worse" in verdicts:
            return "fails (worse)"
        if "inconclusive" in verdicts:
            return "inconclusive"
        return "holds" if all(v == "better" for v in verdicts) else "fails (no gain)"
    if expect == "at_least":
        if "worse" in verdicts:
            return "fails (worse)"
        return "inconclusive" if "inconclusive" in verdicts else "holds"
    if expect == "worse":
        if "better" in verdicts:
            return "fails (better)"
        if "inconclusive" in verdicts:
            return "inconclusive"
        return "holds" if all(v == "worse" for v in verdicts) else "fails (no loss)"
    raise ValueError(f"unknown expectation {expect!r}")


def claims(verdicts: list[dict], tasks: list[str], subject: str = "srlora") -> list[dict]:
    """Each claim with, per task it covers, the outcome and the verdicts behind it (subject vs
    each baseline, in either order of the pair: a reversed entry's verdict is flipped)."""
    out = []
    for c in CLAIMS:
        per_task = {}
        for task in c["tasks"] or tasks:
            if task not in tasks:
                continue
            used = []
            for v in verdicts:
                if v["task"] != task or v["metric"] not in c["metrics"]:
                    continue
                if v["a"] == subject and v["b"] in c["baselines"]:
                    used.append((v["metric"], v["b"], v["verdict"]))
                elif v["b"] == subject and v["a"] in c["baselines"]:
                    used.append((v["metric"], v["a"], _FLIP.get(v["verdict"], v["verdict"])))
            per_task[task] = {
                "outcome": claim_outcome(c["expect"], [u[2] for u in used]),
                "verdicts": [{"metric": m, "against": b, "verdict": x} for m, b, x in used],
            }
        out.append(
            {
                **{k: c[k] for k in ("id", "claim", "metrics", "baselines", "expect")},
                "subject": subject,
                "tasks": per_task,
            }
        )
    return out


# The default rule (issue 14, docs/algorithm.md): a variant replaces the paper's SRLoRA as the
# default only if, on every task of the study, it is better than or equivalent to the paper on
# held-out loss and accuracy, and better on at least one task.
RULE_METRICS = ("final_test_loss", "final_accuracy")


def standing(task_verdicts: list[str]) -> str:
    """One task's standing of a against b from its verdicts on RULE_METRICS: "worse" if any is
    worse; "better" if one is better and none worse; "equivalent" if all are; otherwise
    "inconclusive"; "not run" without verdicts."""
    if not task_verdicts:
        return "not run"
    if "worse" in task_verdicts:
        return "worse"
    if "better" in task_verdicts:
        return "better"
    if all(v == "equivalent" for v in task_verdicts):
        return "equivalent"
    return "inconclusive"


def pair_standing(verdicts: list[dict], task: str, a: str, b: str) -> str:
    """``standing`` of a against b on one task from the complete verdicts of either order of the
    pair (a reversed entry's verdict is flipped); "partial" while only incomplete ones exist."""
    got, partial = [], False
    for v in verdicts:
        if v["task"] != task or v["metric"] not in RULE_METRICS:
            continue
        if (v["a"], v["b"]) == (a, b):
            x = v["verdict"]
        elif (v["a"], v["b"]) == (b, a):
            x = _FLIP.get(v["verdict"], v["verdict"])
        else:
            continue
        if v["complete"]:
            got.append(x)
        else:
            partial = True
    return standing(got) if got or not partial else "partial"


def rule_outcome(standings: list[str]) -> str:
    """passes: better or equivalent on every task and better on one; fails: worse on a task, or
    equivalent everywhere (no gain); undecided: otherwise (an inconclusive or missing task)."""
    if "worse" in standings:
        return "fails (worse)"
    if standings and all(s == "equivalent" for s in standings):
        return "fails (no gain)"
    if standings and all(s in ("better", "equivalent") for s in standings):
        return "passes"
    return "undecided"


def default_rule(
    verdicts: list[dict], tasks: list[str], variant: str, reference: str = "srlora"
) -> dict:
    """The variant's standing against the reference (the paper's SRLoRA) per task, and the
    rule's outcome over all ``tasks``."""
    per_task = {t: pair_standing(verdicts, t, variant, reference) for t in tasks}
    return {
        "variant": variant,
        "reference": reference,
        "tasks": per_task,
        "outcome": rule_outcome(list(per_task.values())),
    }
