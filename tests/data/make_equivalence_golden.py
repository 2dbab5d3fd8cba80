"""Write tests/data/equivalence_c7bf1de.json and the checkpoints under tests/data/ckpt_c7bf1de/
with the code of commit c7bf1de (run once; the test replays the runs with the current code):

    git worktree add /work/wt-old c7bf1de
    cd tests && PYTHONPATH=/work/wt-old/src OMP_NUM_THREADS=1 \
        python3 data/make_equivalence_golden.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
torch.set_num_threads(1)

import equivalence_runs as R  # noqa: E402
import srlora  # noqa: E402


def main() -> None:
    src = Path(srlora.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = {"commit": commit, "torch": torch.__version__, "runs": {}}
    for name in R.CONFIGS:
        out["runs"][name] = R.run(name)
        print(name, [e["step"] for e in out["runs"][name]["history"]], flush=True)
    ck = HERE / "ckpt_c7bf1de"
    shutil.rmtree(ck, ignore_errors=True)
    for name in R.CHECKPOINTED:
        model, ctl, opt = R.build(name)
        R.train(model, ctl, opt, 0, R.CKPT_STEP)
        srlora.save_checkpoint(ck / name, model=model, controller=ctl, optimizer=opt, rng=False)
    (HERE / "equivalence_c7bf1de.json").write_text(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
