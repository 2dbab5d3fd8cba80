"""File plumbing for checkpoints: atomic directory writes, checksums, tensor/JSON splitting.

A checkpoint is a directory. It is written into a temporary directory beside the target and
renamed into place only once every file is complete and flushed, so a process killed during a
save leaves the previous checkpoint (or none) behind, never a half-written one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from ._errors import CheckpointMismatchError

MANIFEST = "manifest.json"
_TENSOR = "__tensor__"


# ---------------------------------------------------------------------- atomic directories
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(target: Path, is_ours) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` (rename, not copy).

    ``is_ours(path)`` must say whether an existing ``target`` may be replaced (a previous
    checkpoint of the same kind, or an empty directory): anything else is refused, so a wrong
    path never wipes a user's files. On an exception the temporary directory is removed and
    ``target`` is untouched. Between the two renames of a replacement, the previous version
    lives at ``.<name>.old-*`` beside it; :func:`resolve_checkpoint_dir` finds it there.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target.is_dir() and (is_ours(target) or not any(target.iterdir()))):
        raise FileExistsError(
            f"{target} exists and is not an srlora checkpoint; refusing to "
            "replace it (choose another path or remove it)"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
        _fsync_dir(parent)
    # left behind by earlier saves that were killed (one save at a time per path): superseded
    for kind in ("old", "tmp"):
        for stale in glob.glob(str(parent / f".{glob.escape(target.name)}.{kind}-*")):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint_dir(path: Path) -> tuple[Path, bool]:
    """The directory to load: ``path``, or, if a save was killed between its two renames, the
    previous version left at ``.<name>.old-*``. Returns (directory, recovered)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path, False
    if not path.exists():
        olds = [
            Path(p)
            for p in glob.glob(str(path.parent / f".{glob.escape(path.name)}.old-*"))
            if (Path(p) / MANIFEST).is_file()
        ]
        if olds:
            return max(olds, key=lambda p: p.stat().st_mtime), True
        raise FileNotFoundError(f"no checkpoint at {path}")
    raise CheckpointMismatchError(
        f"{path} holds no {MANIFEST}: not an srlora checkpoint, or one whose save did not finish"
    )


# ---------------------------------------------------------------------- checksums
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(directory: Path, files: dict[str, dict]) -> None:
    """Check every file named in the manifest: present, same size, same SHA-256."""
    for name, meta in files.items():
        f = directory / name
        if not f.is_file():
            raise CheckpointMismatchError(f"checkpoint file {name} is missing from {directory}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointMismatchError(
                f"checkpoint file {name} has {size} bytes, the manifest "
                f"says {meta['bytes']} (truncated or replaced)"
            )
        if sha256_file(f) != meta["sha256"]:
            raise CheckpointMismatchError(
                f"checkpoint file {name} is corrupted (SHA-256 differs from the manifest)"
            )


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- tensors vs plain data
def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nest of dicts/lists by ``{"__tensor__": key}``.

    Returns the JSON-able skeleton and the tensors by key (keys are the ``/``-joined path).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path):
        if torch.is_tensor(x):
            tensors[path] = x.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: path}
        if isinstance(x, dict):
            return {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(
            f"cannot store {type(x).__name__} at {path!r} (tensors, numbers, "
            "strings, lists and dicts only)"
        )

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            key = skeleton[_TENSOR]
            if key not in tensors:
                raise CheckpointMismatchError(f"tensor {key!r} is missing from the checkpoint")
            return tensors[key]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def check_weights_only(obj: Any, where: str) -> None:
    """Raise unless ``obj`` holds only what ``torch.load(weights_only=True)`` reads back."""
    if torch.is_tensor(obj) or obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_weights_only(k, where)
            check_weights_only(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} holds a {type(obj).__name__}; a checkpoint stores only tensors, "
        "numbers, strings, lists and dicts (torch.load(weights_only=True) reads "
        "nothing else)"
    )
