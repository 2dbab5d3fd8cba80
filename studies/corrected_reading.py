"""The multiplicity-corrected reading of every committed study (issue 26).

Every distinct paired comparison on held-out test loss and test accuracy across the committed
studies in which one side is an SRLoRA method falls in one of three groups:
- family **paper**: the paper's SRLoRA (any rank; no variant field set) against LoRA or PiSSA;
- family **variants**: an SRLoRA variant (any other field set) against the paper's SRLoRA or
  against PiSSA (the question of every variant study);
- **exploratory**: the rest (variants against LoRA or against each other).
A comparison found in several studies (a run set copied by --reuse) counts once. Holm's
step-down correction runs within each family; a difference counts as found when the adjusted p
is below 0.05. Comparisons whose sides come from different sessions ("mixed sessions": one side
copied from an earlier study, made before machine fingerprints) are marked: not one-machine
comparisons.

    python studies/corrected_reading.py            # the comparisons with p < 0.05
    python studies/corrected_reading.py --all      # every comparison
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from srlora_lab.experiments.stats import holm  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
METRICS = ("final_test_loss", "final_accuracy")


PAPER_FIELDS = {"r", "lora_alpha", "r_target"}  # the paper's method at another rank


def _kind(m: dict) -> str:
    if m.get("method") != "srlora":
        return m.get("method", "?")
    return "paper" if set(m.get("config") or {}) <= PAPER_FIELDS else "variant"


def _family(ka: str, kb: str) -> str:
    kinds = {ka, kb}
    if "paper" in kinds and kinds & {"lora", "pissa"}:
        return "paper"
    if "variant" in kinds and kinds & {"paper", "pissa"} and "lora" not in kinds:
        return "variants"
    return "exploratory"


def family(results: str = RESULTS) -> list[dict]:
    rows, seen = [], set()
    for name in sorted(os.listdir(results)):
        path = os.path.join(results, name, "study.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            s = json.load(f)
        methods = {m["name"]: m for m in s["spec"]["methods"]}
        for v in s["verdicts"]:
            if v["metric"] not in METRICS or not v.get("complete") or v.get("p") is None:
                continue
            ka, kb = _kind(methods.get(v["a"], {})), _kind(methods.get(v["b"], {}))
            if "paper" not in (ka, kb) and "variant" not in (ka, kb):
                continue
            key = (v["task"], v["a"], v["b"], v["metric"], round(v["mean_diff"], 10))
            if key in seen:
                continue
            seen.add(key)
            rows.append(
                {
                    "study": name,
                    "family": _family(ka, kb),
                    **{
                        k: v[k]
                        for k in (
                            "task",
                            "a",
                            "b",
                            "metric",
                            "n",
                            "mean_diff",
                            "ci_low",
                            "ci_high",
                            "p",
                            "verdict",
                            "higher_is_better",
                        )
                    },
                    "mixed": bool(v.get("mixed_sessions")),
                }
            )
    for fam in ("paper", "variants", "exploratory"):
        members = [r for r in rows if r["family"] == fam]
        for r, adj in zip(members, holm([r["p"] for r in members])):
            good = (r["mean_diff"] > 0) == r["higher_is_better"]
            r["p_holm"] = adj if fam != "exploratory" else None
            r["found"] = (
                (("better" if good else "worse") if adj < 0.05 else "-")
                if fam != "exploratory"
                else "exploratory"
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| family | study | task | a vs b | metric | a - b [95% CI] | p | Holm p | found |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["family"] == "exploratory", r["family"], r["p"])):
        d = 2 if r["metric"] == "final_accuracy" else 4
        mixed = " (mixed sessions)" if r["mixed"] else ""
        holm_p = f"{r['p_holm']:.2g}" if r["p_holm"] is not None else "-"
        lines.append(
            f"| {r['family']} | {r['study']} | {r['task']} | {r['a']} vs {r['b']}{mixed} "
            f"| {r['metric'].replace('final_', '')} | {r['mean_diff']:+.{d}f} "
            f"[{r['ci_low']:+.{d}f}, {r['ci_high']:+.{d}f}] | {r['p']:.2g} | "
            f"{holm_p} | {r['found']} |"
        )
    return "\n".join(lines)


def counts(rows: list[dict]) -> str:
    out = []
    for fam in ("paper", "variants", "exploratory"):
        m = [r for r in rows if r["family"] == fam]
        found = sum(r["found"] in ("better", "worse") for r in m)
        out.append(
            f"{fam}: {len(m)} comparisons, {sum(r['p'] < 0.05 for r in m)} with p < 0.05 "
            f"(~{0.05 * len(m):.0f} by chance)"
            + (f", {found} survive Holm" if fam != "exploratory" else "")
        )
    return "; ".join(out)


if __name__ == "__main__":
    rows = family()
    print(counts(rows) + "\n")
    print(table(rows if "--all" in sys.argv else [r for r in rows if r["p"] < 0.05]))
