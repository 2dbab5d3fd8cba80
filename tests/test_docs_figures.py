"""Every figure docs/study.md's summary quotes comes from the committed studies: each row of its
corrected table is a row that studies/corrected_reading.py computes from the study.json files."""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "studies"))

import corrected_reading  # noqa: E402


def _summary_rows() -> list[str]:
    text = open(os.path.join(ROOT, "docs", "study.md")).read()
    block = re.search(r"<!-- corrected:begin -->\n(.*?)<!-- corrected:end -->", text, re.S)
    assert block, "docs/study.md lost its corrected table"
    return [ln for ln in block.group(1).splitlines()[2:] if ln.startswith("|")]


def test_every_summary_row_is_recomputed_from_the_committed_studies():
    computed = set(corrected_reading.table(corrected_reading.family()).splitlines()[2:])
    rows = _summary_rows()
    assert len(rows) >= 5
    missing = [r for r in rows if r not in computed]
    assert missing == [], f"rows that the committed studies do not give: {missing}"


def test_the_summary_counts_match_the_families():
    rows = corrected_reading.family()
    text = open(os.path.join(ROOT, "docs", "study.md")).read()
    paper = [r for r in rows if r["family"] == "paper"]
    variants = [r for r in rows if r["family"] == "variants"]
    assert f"({len(paper)}\ncomparisons" in text or f"({len(paper)} comparisons" in text
    assert f"every variant against the published SRLoRA or PiSSA ({len(variants)})" in text
    assert f"{sum(r['p'] < 0.05 for r in paper)} of {len(paper)} comparisons" in text
    assert f"one of {len(variants)} survives" in text
    # two distinct findings (rt-polarity's is counted twice: paper-claims and its one-machine
    # replicate in headroom-methods-text), both against SRLoRA
    found = [r for r in paper if r["found"] != "-"]
    assert len({(r["task"], r["a"], r["b"], r["metric"]) for r in found}) == 2
    assert all(r["found"] == "worse" for r in found)


HEADROOM_STUDIES = (
    "headroom",
    "headroom-images",
    "headroom-methods-images",
    "headroom-methods-text",
)


def _headroom_block() -> str:
    text = open(os.path.join(ROOT, "docs", "study.md")).read()
    block = re.search(r"<!-- headroom:begin -->\n(.*?)<!-- headroom:end -->", text, re.S)
    assert block, "docs/study.md lost its headroom section"
    return block.group(1)


def test_the_headroom_sections_confirmatory_rows_are_the_studies():
    """Each declared comparison of the headroom studies that has run is quoted in docs/study.md's
    headroom section on one table row, with its interval (3 decimals) and its Holm p (2
    significant digits) as the committed study.json computes them, and what was found."""
    rows = [ln for ln in _headroom_block().splitlines() if ln.startswith("|")]
    quoted = 0
    for name in HEADROOM_STUDIES:
        path = os.path.join(ROOT, "studies", "results", name, "study.json")
        assert os.path.isfile(path), f"{name}: no committed study.json"
        with open(path) as f:
            study = json.load(f)
        for c in study.get("confirmatory") or []:
            if c.get("p_holm") is None:
                continue
            ci = f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
            holm = f"| {c['p_holm']:.2g} |"
            hits = [r for r in rows if ci in r and holm in r and c["finding"] in r]
            assert hits, f"{name}: {c['task']} {c['a']} vs {c['b']}: no row with {ci}, {holm}"
            quoted += 1
    assert quoted >= 16
