"""What a run ran on: a fingerprint of the machine and the numerical stack.

Runs with the same seed and settings give the same numbers on one machine, not across machines
(a different CPU takes other SIMD kernels: fashion-mnist test losses moved by up to 0.026 per
seed between two machines, docs/study.md). A study therefore pairs only runs whose fingerprints
are equal, and ``--reuse``/``--resume`` never mix them.

The fingerprint holds what changes the arithmetic: the CPU model and its instruction-set flags,
torch's CPU capability (the kernels it dispatches to), the torch and BLAS versions, the thread
count, and the CUDA device when a run used one. Its ``id`` is a short hash of all of that.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from typing import Optional


def _cpuinfo_lines() -> Optional[list[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return None


def cpu_model(lines: Optional[list[str]] = None) -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (None where it has none or cannot be read)."""
    lines = _cpuinfo_lines() if lines is None else lines
    for line in lines or ():
        key, _, val = line.partition(":")
        if key.strip() == "model name":
            return val.strip()
    return None


def _cpuinfo() -> dict:
    out = {"cpu": platform.processor() or platform.machine(), "flags_sha": None}
    lines = _cpuinfo_lines()
    if lines is None:
        return out
    out["cpu"] = cpu_model(lines) or out["cpu"]
    for line in lines:
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = " ".join(sorted(val.split()))
            out["flags_sha"] = hashlib.sha256(flags.encode()).hexdigest()[:16]
            break
    return out


def _blas(config: str) -> str:
    """BLAS / LAPACK names and the math libraries' versions from ``torch.__config__.show()``."""
    keep = [
        ln.strip(" -")
        for ln in config.splitlines()
        if not ln.strip().startswith("- Build settings")
        and any(k in ln for k in ("MKL", "BLAS", "LAPACK", "oneDNN"))
    ]
    keep += re.findall(r"\b(?:BLAS_INFO|LAPACK_INFO)=[^,]*", config)
    return "; ".join(re.sub(r" \(Git Hash [0-9a-f]+\)", "", k) for k in keep)


def machine_fingerprint(threads: Optional[int] = None, device: str = "cpu") -> dict:
    """The fingerprint of this process's machine and stack (``threads``: the run's thread
    budget; default torch's current one)."""
    import torch

    fp = {
        **_cpuinfo(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": _blas(torch.__config__.show()),
        "threads": int(threads if threads is not None else torch.get_num_threads()),
    }
    if device != "cpu" and torch.cuda.is_available():
        fp["cuda_device"] = torch.cuda.get_device_name()
        fp["cuda"] = torch.version.cuda
    fp["id"] = fingerprint_id(fp)
    return fp


def fingerprint_id(fp: dict) -> str:
    """Short hash of a fingerprint's content (every key but ``id``)."""
    body = json.dumps({k: v for k, v in fp.items() if k != "id"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def record_id(rec: dict) -> Optional[str]:
    """The fingerprint id of a run record; None for a record written before fingerprints."""
    fp = rec.get("fingerprint")
    return fp.get("id") if isinstance(fp, dict) else None
