"""The committed studies stay recomputable and the tree stays small enough to travel.

- every study under studies/results recomputes, from its compact run records, the verdicts, lr
  choices and claims its study.json holds (so compaction lost nothing a verdict needs), and every
  record's checksum holds;
- the tracked files weigh at most 32 MiB (a GPU machine takes 64 MiB with the wheels).
"""

import json
import os
import subprocess

import pytest

from srlora_lab.experiments import study, study_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "studies", "results")
STUDIES = sorted(
    d for d in os.listdir(RESULTS) if os.path.isfile(os.path.join(RESULTS, d, "study.json"))
)


@pytest.mark.parametrize("name", STUDIES)
def test_verdicts_recompute_from_the_compact_records(name):
    out = os.path.join(RESULTS, name)
    with open(os.path.join(out, "study.json")) as f:
        saved = json.load(f)
    spec = study_spec.load(os.path.join(ROOT, "studies", f"{name}.yaml"))
    st = study.Study(spec, out)  # no repair: a damaged or edited record raises
    assert st.load_done() == len(saved["runs"])
    got = st.summary(saved["meta"], saved["status"], 0.0)
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN too
    assert same(got["verdicts"], saved["verdicts"])
    assert same(got["lr_selection"], saved["lr_selection"])
    assert same(got["claims"], saved["claims"])


def test_the_tracked_tree_fits_a_gpu_machine():
    files = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    total = sum(
        os.path.getsize(os.path.join(ROOT, f.decode()))
        for f in files
        if f and os.path.isfile(os.path.join(ROOT, f.decode()))
    )
    assert total <= 32 * 2**20, f"tracked files: {total / 2**20:.1f} MiB"
