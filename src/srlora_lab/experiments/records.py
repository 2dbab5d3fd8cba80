"""Run records on disk: their compact form, their checksum, their file names and the study lock.

A study keeps one JSON record per run. What a verdict needs is small (the metrics, the curves, the
switch steps, the diagnostics summary); what the mechanism plots of ``srlora compare`` read (every
fused pair, every module's spectrum, every switch's scores) is large: up to 1.4 MB per causal-LM
run. A study therefore writes the compact form unless its spec says ``records: full``:

- ``diagnostics`` keeps its ``summary`` and each module's effective rank (``erank``), not the
  fused pairs or the spectra;
- ``switches`` (each switch's per-module scores) is left out; ``switch_steps``,
  ``num_switches`` and ``pointers`` stay.

Every record carries ``sha256``: the hash of its canonical JSON without that key. A record whose
text is not JSON, whose hash does not match, or that has a machine fingerprint but no hash (the
two were introduced together) is *damaged*: ``--report`` refuses it naming the
file, ``--resume`` moves it aside (``<file>.damaged``) and runs it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

BULKY_DIAGNOSTICS = ("pairs", "spectra", "modules", "spectrum_top")


class RecordError(Exception):
    """A run record that cannot be trusted (unreadable, not JSON, or its checksum differs)."""


def lr_text(lr: float) -> str:
    """The learning rate as a file name writes it: the shortest text that reads back as the same
    float (``repr``), so two distinct lrs never share a file (``:g`` made 0.001 and
    0.0010000001 one name). For the grids in use (1e-4, 3e-4, 0.001, ...) it equals ``:g``."""
    return repr(float(lr))


def compact_record(rec: dict) -> dict:
    """``rec`` without its bulky per-switch and per-module parts (see the module docstring)."""
    out = {k: v for k, v in rec.items() if k != "switches"}
    diag = rec.get("diagnostics")
    if isinstance(diag, dict) and any(k in diag for k in BULKY_DIAGNOSTICS):
        slim = {k: v for k, v in diag.items() if k not in BULKY_DIAGNOSTICS}
        if isinstance(diag.get("spectra"), list):
            slim["erank"] = [s.get("erank") for s in diag["spectra"]]
        out["diagnostics"] = slim
    return out


def checksum(rec: dict) -> str:
    body = {k: v for k, v in rec.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(rec: dict) -> dict:
    """``rec`` with its ``sha256``."""
    return {**{k: v for k, v in rec.items() if k != "sha256"}, "sha256": checksum(rec)}


def read_record(path: str) -> dict:
    """The record at ``path``; RecordError (naming the file and what is wrong) when it is not
    JSON or its checksum does not match. A record written before checksums has none and is
    read as it is."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"{path}: damaged run record (not valid JSON: {e.msg} at line {e.lineno})"
        ) from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: damaged run record (not UTF-8 text: byte {e.start})") from None
    except OSError as e:
        raise RecordError(f"{path}: cannot read the run record ({e.strerror or e})") from None
    if not isinstance(rec, dict):
        raise RecordError(f"{path}: damaged run record (not a JSON object)")
    if "sha256" not in rec and "fingerprint" in rec:  # both came in one change: sealed then
        raise RecordError(
            f"{path}: damaged run record (it has a machine fingerprint, so it was "
            "written with a sha256, and that is gone)"
        )
    if "sha256" in rec and rec["sha256"] != checksum(rec):
        raise RecordError(
            f"{path}: run record changed since it was written (its sha256 does "
            "not match its content)"
        )
    return rec


def set_aside(path: str) -> str:
    """Move a damaged record out of the way (kept, never deleted); returns its new path."""
    dst, k = path + ".damaged", 1
    while os.path.exists(dst):
        k += 1
        dst = f"{path}.damaged{k}"
    os.replace(path, dst)
    return dst


class StudyLock:
    """The one process that may write a study folder: an exclusive ``flock`` on ``DIR/.lock``.

    The kernel drops the lock when its process ends, however it ends, so a killed study never
    leaves the folder locked; the file only says who holds it."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")
        self._fd: Optional[int] = None

    def acquire(self) -> "StudyLock":
        import fcntl

        if self._fd is not None:
            return self
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RecordError(
                f"{self.path}: cannot open the study's lock file "
                f"({e.strerror or e}); choose a writable --out, or remove what "
                "is at that path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise RecordError(
                f"{os.path.dirname(self.path)}: another srlora study is using this "
                f"folder (pid {holder}); wait for it or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
