"""Run a documented multi-process example (torchrun, accelerate launch) as a user would."""

from __future__ import annotations

import os
import subprocess
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(cmd: list[str], **env_extra: str) -> str:
    """Run ``cmd`` in the repository root with the source tree on the path and the hub offline;
    assert it exits 0 and return its stdout."""
    env = dict(
        os.environ,
        PYTHONPATH=os.path.join(ROOT, "src"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        **env_extra,
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0 and aborted_after_the_work(proc.stdout, proc.stderr):
        # torch's gloo teardown aborted a rank after every check had passed (seen once in CI,
        # not reproduced in 4 + 30 local runs; the examples now free the wrapped model and
        # destroy the group before exit). The run is repeated once, and all of it must pass.
        warnings.warn(
            "a rank aborted in gloo's teardown after the example's checks passed; "
            "running it again: " + proc.stderr[-500:]
        )
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def aborted_after_the_work(stdout: str, stderr: str) -> bool:
    """The example printed its last line (all its checks passed on every rank) and a rank then
    died in C++ teardown: std::terminate on a thread still joinable."""
    return (
        "replicas identical:" in stdout and "terminate called without an active exception" in stderr
    )
