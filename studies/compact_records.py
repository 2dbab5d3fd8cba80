"""Convert committed study records to the compact, checksummed form (issue 24: a tree a GPU
machine can take). Run once from the repository root: ``python studies/compact_records.py``.

For every run record under ``studies/results/<study>/runs``:
- ``copied_from``: the study (in the order the studies were first committed) that first holds a
  record with the same training-loss curve and test loss, when that is another study: the run was
  copied by ``--reuse`` and was made in another session, possibly on another machine (records of
  that time carry no machine fingerprint);
- the compact form (experiments/records.py: no per-switch scores, no per-module spectra or fused
  pairs; the diagnostics summary and each module's effective rank stay) and its ``sha256``.
The full records stay in git history (commit c7bf1de). Then run each study's ``--report`` and
compare its verdicts with the committed ones (``--check`` prints any difference).
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from srlora_lab.experiments.records import compact_record, seal  # noqa: E402

ORDER = [
    "paper-claims",
    "variants-first",
    "variants",
    "lm-cpu",
    "schedule",
    "span",
    "low-rank-images",
    "lm-variants",
    "rewarm-text",
]  # first commit of each study's runs


def content_key(rec: dict) -> tuple:
    return (
        rec.get("task"),
        rec.get("lr"),
        rec.get("seed"),
        rec.get("steps"),
        tuple(rec.get("train_loss") or ()),
        rec.get("final_test_loss"),
    )


def main(root: str = "studies/results") -> None:
    first: dict = {}
    for study in ORDER:
        for path in sorted(
            glob.glob(os.path.join(root, study, "runs", "**", "*.json"), recursive=True)
        ):
            with open(path) as f:
                rec = json.load(f)
            rec.pop("copied_from", None)
            if rec.get("train_loss"):  # a failed run has no curve to recognise it by
                origin = first.setdefault(content_key(rec), study)
                if origin != study:
                    rec["copied_from"] = origin
            rec = seal(compact_record(rec))
            with open(path, "w") as f:
                json.dump(rec, f, indent=1)
        print(f"{study}: done", flush=True)


if __name__ == "__main__":
    main()
