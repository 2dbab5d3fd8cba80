"""The study's tables (markdown): claim x task, then every verdict and the lr choices per task."""

from __future__ import annotations

import math

from .study_verdicts import default_rule, pair_standing

SHORT = {"holds": "holds", "inconclusive": "inconclusive", "not run": "-"}


def _num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def claims_table(summary: dict) -> str:
    tasks = [t["name"] for t in summary["spec"]["tasks"]]
    lines = ["| claim | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for c in summary["claims"]:
        cells = []
        for t in tasks:
            cell = c["tasks"].get(t)
            cells.append(SHORT.get(cell["outcome"], cell["outcome"]) if cell else "n/a")
        lines.append(f"| ({c['id']}) {c['claim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_table(summary: dict) -> str:
    """Each pair of the spec x task: the verdicts on held-out loss and on accuracy (the headline
    of a study that is not about the paper's claims, e.g. the variants)."""
    tasks = [t["name"] for t in summary["spec"]["tasks"]]
    lines = ["| a vs b | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for a, b in summary["spec"]["pairs"]:
        cells = []
        for t in tasks:
            got = {
                v["metric"]: v
                for v in summary["verdicts"]
                if v["task"] == t and v["a"] == a and v["b"] == b
            }
            parts = [
                f"{label} {got[m]['verdict']}" + ("" if got[m]["complete"] else " [partial]")
                for m, label in (("final_test_loss", "loss"), ("final_accuracy", "acc"))
                if m in got
            ]
            cells.append(", ".join(parts) or "-")
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rule_variants(summary: dict) -> list[str]:
    """The spec's SRLoRA variants paired with the paper's SRLoRA ("srlora"), in spec order."""
    paired = {x for a, b in summary["spec"]["pairs"] for x in (a, b) if "srlora" in (a, b)}
    return [
        m["name"]
        for m in summary["spec"]["methods"]
        if isinstance(m, dict)
        and m.get("method") == "srlora"
        and m["name"] != "srlora"
        and m["name"] in paired
    ]


def rule_table(summary: dict) -> str:
    """Each variant x task: its standing against the paper and against PiSSA on held-out loss and
    accuracy together (study_verdicts.standing), and the default rule's outcome."""
    tasks = [t["name"] for t in summary["spec"]["tasks"]]
    lines = [
        "| variant | "
        + " | ".join(f"{t}: vs paper / vs pissa" for t in tasks)
        + " | default rule |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for name in rule_variants(summary):
        rule = default_rule(summary["verdicts"], tasks, name)
        cells = [
            f"{rule['tasks'][t]} / {pair_standing(summary['verdicts'], t, name, 'pissa')}"
            for t in tasks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rule['outcome']} |")
    return "\n".join(lines)


def verdict_table(summary: dict, task: str) -> str:
    rows = [v for v in summary["verdicts"] if v["task"] == task]
    if not rows:
        return "(no paired final runs yet)"
    lines = [
        "| metric | a vs b | n | mean a | mean b | a - b [95% CI] | p | margin | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in rows:
        d = 2 if v["metric"].endswith("accuracy") else 4
        verdict = v["verdict"]
        if verdict == "inconclusive" and v.get("seeds_needed"):
            verdict += f" (~{v['seeds_needed']} seeds)"
        elif v.get("within_margin") and verdict in ("better", "worse"):
            verdict += " (within margin)"
        if not v["complete"]:
            verdict += " [partial]"
        if v.get("mixed_sessions"):
            verdict += " [mixed sessions]"
        lines.append(
            f"| {v['metric']} | {v['a']} vs {v['b']} | {v['n']} | {_num(v['mean_a'], d)}"
            f" | {_num(v['mean_b'], d)} | {_num(v['mean_diff'], d)} "
            f"[{_num(v['ci_low'], d)}, {_num(v['ci_high'], d)}] | {_p(v.get('p'))} | "
            f"{_num(v['margin'], d)} | {verdict} |"
        )
    out = "\n".join(lines)
    if any(v.get("mixed_sessions") for v in rows):
        out += (
            "\n\n[mixed sessions]: one side's runs were copied from another study (made in "
            "another session, before machine fingerprints, possibly on another machine): "
            "not a one-machine comparison."
        )
    return out


def selection_table(summary: dict, task: str) -> str:
    sel = summary["lr_selection"]["tasks"].get(task, {})
    lines = ["| method | lr: mean val loss / val acc % | chosen |", "|---|---|---|"]
    for m, s in sel.items():
        if s is None:
            lines.append(f"| {m} | (selection not finished) | |")
            continue
        cells = ", ".join(
            f"{r['lr']:g}: "
            + (
                f"{r['mean_val_loss']:.4f} / {100 * r['mean_val_accuracy']:.1f}"
                if r["mean_val_accuracy"] is not None
                else _num(r["mean_val_loss"], 4)
                if r["mean_val_loss"] is not None
                else f"failed (seeds {r['failed_seeds']})"
            )
            for r in s["rows"]
        )
        chosen = "none (every lr failed)" if s["chosen"] is None else f"{s['chosen']:g}"
        lines.append(f"| {m} | {cells} | {chosen} |")
    return "\n".join(lines)


def mechanism_table(summary: dict, task: str) -> str:
    """Per method at its chosen lr, over its final seeds: the mechanism numbers of its runs'
    diagnostics (mean over seeds), or an empty string when no run has them."""
    steps = next(t["steps"] for t in summary["spec"]["tasks"] if t["name"] == task)
    sel = summary["lr_selection"]["tasks"].get(task, {})
    seeds = set(summary["spec"]["final"]["seeds"])
    cols = (
        ("erank_mean", "eff. rank of W_final - W0", 1, 1.0),
        ("survived_frac", "inserted directions surviving an interval %", 1, 100.0),
        ("age_median", "fused pairs' age, median steps", 0, 1.0),
        ("moved_median", "fused pairs moved, median (rel.)", 2, 1.0),
    )
    lines = []
    for m, s in sel.items():
        lr = s and s["chosen"]
        runs = [
            r
            for r in summary["runs"]
            if r["task"] == task
            and r["name"] == m
            and r["lr"] == lr
            and r["steps"] == steps
            and r["seed"] in seeds
            and r.get("mechanism")
        ]
        if not runs:
            continue
        cells = []
        for key, _, d, scale in cols:
            v = [r["mechanism"][key] for r in runs if key in r["mechanism"]]
            cells.append(_num(scale * sum(v) / len(v), d) if v else "-")
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = "| method | seeds | " + " | ".join(c[1] for c in cols) + " |"
    return "\n".join(
        [
            "Mechanism (mean over the final seeds at the chosen lr; experiments/diagnostics.py):",
            "",
            head,
            "|---|---|" + "---|" * len(cols),
        ]
        + lines
    )


def switch_gap_table(summary: dict, task: str) -> str:
    """Per pair whose ``a`` switched: its paired training-loss gaps (experiments/switch_gaps.py),
    mean over the final seeds [95% interval], or an empty string when there are none."""
    rows = [g for g in summary.get("switch_gaps") or [] if g["task"] == task]
    if not rows:
        return ""
    cell = lambda c: f"{c['mean']:+.3f} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
    w = sorted({g["window"] for g in rows if g["window"]})  # None: seeds switched differently
    side = (
        f"{'/'.join(map(str, w))} steps each side"
        if w and all(g["window"] for g in rows)
        else "10 steps each side, or a quarter of the shortest interval"
    )
    lines = [
        "Training-loss gap a - b around a's switches (paired final seeds, 95% interval; "
        "experiments/switch_gaps.py): before the first switch, after it, in the last "
        "interval, and its change across a switch "
        f"({side}); "
        "learning rates that differ confound all four:",
        "",
        "| a | b | lr a, b | seeds | before | after | last | jump at a switch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in rows:
        lrs = f"{g['lr_a']:g}, {g['lr_b']:g}" + ("" if g["lr_a"] == g["lr_b"] else " (differ)")
        lines.append(
            f"| {g['a']} | {g['b']} | {lrs} | {g['n']} | "
            + " | ".join(cell(g[k]) for k in ("before", "after", "last", "jump"))
            + " |"
        )
    by = [g for g in rows if g.get("intervals")]
    if by:  # which switch opens the gap: one column per interval between switches
        steps = [0, *by[0]["switch_steps"]]
        lines += [
            "",
            "The same gap interval by interval (an interval starts at the step named; "
            "mean [95% interval]):",
            "",
            "| a | b | " + " | ".join(f"from {s}" for s in steps) + " |",
            "|---|---|" + "---|" * len(steps),
        ]
        for g in by:
            if [0, *g["switch_steps"]] == steps:
                lines.append(
                    f"| {g['a']} | {g['b']} | " + " | ".join(cell(c) for c in g["intervals"]) + " |"
                )
    return "\n".join(lines)


def _p(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"  # every paired difference the same nonzero number
    return f"{x:.2g}" if x >= 0.001 else f"{x:.1e}"


def confirmatory_table(summary: dict) -> str:
    """The family declared before the runs: each comparison, its prediction, the paired
    interval, p and Holm's adjusted p, and what was found."""
    lines = [
        "| task | a vs b | metric | prediction | a - b [95% CI] | p | Holm p | found |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.get("confirmatory") or []:
        iv = (
            "pending"
            if r.get("mean_diff") is None
            else f"{_num(r['mean_diff'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
        )
        lines.append(
            f"| {r['task']} | {r['a']} vs {r['b']} | {r['metric']} | {r['prediction']} "
            f"| {iv} | {_p(r.get('p'))} | {_p(r.get('p_holm'))} | {r['finding']} |"
        )
    return "\n".join(lines)


def headroom_table(summary: dict) -> str:
    """Per task and metric: H = full - LoRA(r) and each method's recovered fraction of it."""
    lines = [
        "| task | metric | H = full - LoRA [95% CI] (n) | method | method - LoRA [95% CI] | "
        "fraction of H [95% bootstrap CI] |",
        "|---|---|---|---|---|---|",
    ]
    for h in summary.get("headroom") or []:
        for metric, e in h["metrics"].items():
            H = e["H"]
            head = (
                f"| {h['task']} | {metric} | {_num(H['mean_diff'])} [{_num(H['ci_low'])}, "
                f"{_num(H['ci_high'])}] ({H['n']}) "
            )
            rows = e["methods"] or [{"method": "-", "n": 0}]
            for m in rows:
                if "fraction" not in m:
                    lines.append(head + f"| {m['method']} | pending | - |")
                    continue
                d, f = m["vs_lora"], m["fraction"]
                frac = (
                    "undefined: full fine-tuning is not ahead of LoRA here"
                    if f is None
                    else f"{_num(f['ratio'], 2)} [{_num(f['ci_low'], 2)}, {_num(f['ci_high'], 2)}]"
                )
                lines.append(
                    head + f"| {m['method']} | {_num(d['mean_diff'])} "
                    f"[{_num(d['ci_low'])}, {_num(d['ci_high'])}] | {frac} |"
                )
    return "\n".join(lines)


def format_markdown(summary: dict) -> str:
    spec = summary["spec"]
    out = [
        f"# Study `{spec['name']}`: verdicts ({summary['status']}, "
        f"{summary['wall_time_s'] / 60:.0f} min)",
        "",
    ]
    if spec.get("smoke"):
        out += [
            "**Smoke spec: too few seeds or learning rates for a verdict to mean anything.**",
            "",
        ]
    if summary.get("confirmatory"):
        out += [
            "Confirmatory comparisons (declared with their predictions before the runs; "
            "Holm's correction over this family; 'found' needs Holm p < 0.05). Every other "
            "verdict below is **exploratory**.",
            "",
            confirmatory_table(summary),
            "",
        ]
    else:
        out += [
            "No comparison was declared confirmatory: every verdict below is "
            "**exploratory** (uncorrected 95% intervals).",
            "",
        ]
    if summary.get("headroom"):
        out += [
            "Headroom (full fine-tuning against LoRA at the same r, paired seeds of one "
            "machine; a method's fraction is (method - LoRA) / H, 1 = as good as full "
            "fine-tuning, 0 = no better than LoRA):",
            "",
            headroom_table(summary),
            "",
        ]
    names = [m["name"] if isinstance(m, dict) else m for m in spec["methods"]]
    if "lora" in names and "srlora" in names:  # the paper's claims: SRLoRA vs LoRA and PiSSA
        out += [
            "Claims (SRLoRA against the baselines named in each claim; see docs/study.md):",
            "",
            claims_table(summary),
            "",
        ]
    out += [
        "Pairs (a - b on held-out test loss and on test accuracy; a 'worse' loss is a higher one):",
        "",
        pairs_table(summary),
        "",
    ]
    if rule_variants(summary):
        out += [
            "Default rule (a variant replaces the paper's SRLoRA only if better than or "
            "equivalent to it on every task, better on one; per task: worse if test loss or "
            "accuracy is worse, better if one is better and none worse):",
            "",
            rule_table(summary),
            "",
        ]
    out += [
        f"Margins: {spec['margins']['accuracy']} accuracy points; "
        f"{100 * spec['margins']['loss_rel']:g}% of the mean loss. Accuracy in %. "
        f"lr choice: {summary['lr_selection']['criterion']}.",
        "",
    ]
    for t in spec["tasks"]:
        out += [
            f"## {t['name']} ({t['steps']} steps, batch {t['batch_size']}; selection "
            f"{t['selection_steps']} steps)",
            "",
            selection_table(summary, t["name"]),
            "",
            verdict_table(summary, t["name"]),
            "",
        ]
        mech = mechanism_table(summary, t["name"])
        if mech:
            out += [mech, ""]
        gaps = switch_gap_table(summary, t["name"])
        if gaps:
            out += [gaps, ""]
    return "\n".join(out)


def format_console(summary: dict) -> str:
    """The claim x task table (the pair x task table for a study without LoRA; then the default
    rule's table when the spec has SRLoRA variants) and a one-line count of verdicts (the end of
    the CLI's output)."""
    counts: dict = {}
    for v in summary["verdicts"]:
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    names = [m["name"] if isinstance(m, dict) else m for m in summary["spec"]["methods"]]
    head = claims_table(summary) if {"lora", "srlora"} <= set(names) else pairs_table(summary)
    if rule_variants(summary):
        head += "\n\n" + rule_table(summary)
    return "\n".join(
        [head, "", "verdicts: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))]
    )
