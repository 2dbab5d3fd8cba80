"""Checkpoints of one experiment run: every ``save_every`` optimizer steps, and resume.

A run's checkpoints live in ``<run_dir>/step-<N>`` (srlora.save_checkpoint: atomic, checked);
the run's own progress (losses, eval curve) rides in the manifest's ``extra``. Only the newest
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import srlora

_STEP = re.compile(r"^step-(\d+)$")


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, "manifest.json")):
            out.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(out)


def latest(run_dir: str) -> Optional[str]:
    c = checkpoints(run_dir)
    return c[-1][1] if c else None


def save(
    run_dir: str, step: int, model, controller, optimizer, scheduler, progress: dict, keep: int = 2
) -> str:
    path = os.path.join(run_dir, f"step-{step}")
    srlora.save_checkpoint(
        path,
        model=model,
        controller=controller,
        optimizer=optimizer,
        scheduler=scheduler,
        extra={"progress": progress},
    )
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: str, model, controller, optimizer, scheduler) -> dict:
    """Load a checkpoint into fresh objects; returns the run progress saved with it."""
    srlora.load_checkpoint(
        path, model=model, controller=controller, optimizer=optimizer, scheduler=scheduler
    )
    return srlora.read_manifest(path).get("extra", {}).get("progress", {})
