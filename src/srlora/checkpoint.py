"""Exact checkpoint and resume: ``save_checkpoint`` / ``load_checkpoint``.

SRLoRA writes into the frozen weights (the PiSSA residual at init, fused pairs at each switch),
so an adapter file alone cannot rebuild a run. A checkpoint directory holds everything:

  model.safetensors       adapted base weights (fusion="weight"; with "virtual" they stay W0 and
                          are fingerprinted), every trainable tensor (LoRA factors,
                          modules_to_save), buffers
  controller.safetensors  the controller's tensors (SVD cache, ledger, residuals/originals,
                          importance state)
  controller.json         the controller's plain data (pointers, step counters, history)
  training_state.pt       optimizer, scheduler and RNG states; loads with weights_only=True
  manifest.json           format version, config, module shapes, step, file sizes + SHA-256,
                          a fingerprint of the frozen weights it does not store

Saving writes a temporary directory and renames it into place. Loading reads and checks
everything (checksums, keys, shapes, dtypes, config, base-model fingerprint, optimizer layout)
before it writes anything into the live objects, and raises CheckpointMismatchError naming the
difference otherwise.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ._ckpt_io import (
    MANIFEST,
    atomic_directory,
    check_weights_only,
    fsync_file,
    join_tensors,
    resolve_checkpoint_dir,
    sha256_file,
    split_tensors,
    verify_files,
    write_json,
)
from ._errors import CheckpointMismatchError
from .controller import SRLoRAController
from .controller_state import check_config, first
from .engines import unwrap_optimizer
from .fsdp_tensors import copy_into_, full, full_tree, is_dtensor, shard_like

FORMAT = "srlora-checkpoint"
FORMAT_VERSION = 3  # 3: the manifest carries its own SHA-256; 2: bf16 residuals hold bits 8..15
# of the fp32 value (1: spacing units)
MODEL_FILE = "model.safetensors"
CONTROLLER_TENSORS = "controller.safetensors"
CONTROLLER_JSON = "controller.json"
TRAINING_STATE = "training_state.pt"

__all__ = ["save_checkpoint", "load_checkpoint", "read_manifest"]


# ---------------------------------------------------------------------- what is saved
def _resolve_model(model, controller: SRLoRAController):
    if not isinstance(controller, SRLoRAController):
        raise TypeError(f"controller must be an SRLoRAController, got {type(controller).__name__}")
    if model is None:
        return controller.model
    if model is not controller.model:
        raise ValueError(
            "model is not the model this controller adapts (pass the PeftModel "
            "returned by srlora.wrap together with its controller)"
        )
    return model


def _saved_tensors(model, controller: SRLoRAController) -> dict[str, torch.Tensor]:
    """Live tensors a checkpoint stores: adapted base weights, trainable parameters, buffers."""
    base = (
        {id(L.base_weight) for L in controller.layers}
        if controller.config.fusion == "weight"
        else set()
    )  # fusion="virtual": W0 is never written, so it is fingerprinted instead
    out = {name: p for name, p in model.named_parameters() if p.requires_grad or id(p) in base}
    out.update(dict(model.named_buffers()))
    return out


def _fingerprinted(model, controller: SRLoRAController, saved: dict) -> dict[str, torch.Tensor]:
    """Frozen weights the checkpoint relies on without storing: they must match on load.

    For method='lora' the adapted base weights never change, so they are checked too.
    """
    out = {n: p for n, p in model.named_parameters() if n not in saved}
    if controller.config.method == "lora":
        base = {id(L.base_weight) for L in controller.layers}
        out.update({n: p for n, p in model.named_parameters() if id(p) in base})
    return out


@torch.no_grad()
def _fingerprint(t: torch.Tensor) -> list[float]:
    """Two float64 sums that change when the tensor's values (or their order) change."""
    x = full(t.detach()).reshape(-1).double()  # FSDP2: the whole weight (a collective)
    by_position = torch.nn.functional.pad(x.abs(), (0, (-x.numel()) % 3)).reshape(-1, 3).sum(0)
    return [
        float((x * x).sum()),
        float(by_position @ torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=x.device)),
    ]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [
            kind,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states of {len(state['cuda'])} devices, "
                f"this process sees {torch.cuda.device_count()}: CUDA RNG not restored",
                RuntimeWarning,
                stacklevel=3,
            )


def _is_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _normalized(x):
    return json.loads(json.dumps(x))


# ---------------------------------------------------------------------- save
def save_checkpoint(
    path,
    *,
    model=None,
    controller: SRLoRAController,
    optimizer=None,
    scheduler=None,
    rng: bool = True,
    extra: Optional[dict] = None,
) -> Path:
    """Save everything needed to resume an SRLoRA run exactly, atomically, into directory ``path``.

    ``model`` is the PeftModel from ``srlora.wrap`` (default: ``controller.model``). ``optimizer``
    may be an accelerate wrapper. An existing checkpoint at ``path`` is replaced only once the
    new one is complete; an existing directory that is not a checkpoint is refused. Call it on
    one process only; under FSDP2 (DTensor parameters) on every rank: the shards are gathered
    and rank 0 writes the same checkpoint a single process would. ``extra`` (JSON-able) is kept
    in the manifest. Returns the directory.
    """
    model = _resolve_model(model, controller)
    live = _saved_tensors(model, controller)
    sharded = any(is_dtensor(t) for t in live.values())
    live = {k: full(t) for k, t in live.items()}  # FSDP2: whole tensors (collectives)
    skeleton, ctensors = split_tensors(controller.state_dict())
    state: dict = {}
    inner = unwrap_optimizer(optimizer) if optimizer is not None else None
    if inner is not None:
        state["optimizer"] = full_tree(inner.state_dict())
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = _rng_state()
    check_weights_only(state, "training state")  # raises before anything is written
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "srlora_version": _version(),
        "torch_version": torch.__version__,
        "step": controller.global_step,
        "num_switches": controller.num_switches,
        "config": _normalized(controller.config.to_dict()),
        "modules": {
            L.name: {
                "shape": list(L.shape),
                "r": L.r,
                "scaling": L.scaling,
                "base_dtype": str(L.base_weight.dtype).replace("torch.", ""),
            }
            for L in controller.layers
        },
        "model_tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for k, t in live.items()
        },
        "base_fingerprint": {
            n: _fingerprint(p) for n, p in _fingerprinted(model, controller, live).items()
        },
        "optimizer": type(inner).__name__ if inner is not None else None,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "rng": bool(rng),
        "extra": _normalized(extra or {}),
    }
    if sharded:  # every rank gathered; rank 0 writes
        import torch.distributed as dist

        if dist.get_rank() != 0:
            dist.barrier()
            return Path(path)
        try:
            return _write(path, live, ctensors, skeleton, state, manifest)
        finally:
            dist.barrier()
    return _write(path, live, ctensors, skeleton, state, manifest)


def _write(path, live: dict, ctensors: dict, skeleton: dict, state: dict, manifest: dict) -> Path:
    with atomic_directory(Path(path), _is_checkpoint) as tmp:
        save_file(
            {k: t.detach().to("cpu", copy=True).contiguous() for k, t in live.items()},
            str(tmp / MODEL_FILE),
        )
        save_file(ctensors, str(tmp / CONTROLLER_TENSORS))
        write_json(tmp / CONTROLLER_JSON, skeleton)
        names = [MODEL_FILE, CONTROLLER_TENSORS, CONTROLLER_JSON]
        if state:
            torch.save(state, tmp / TRAINING_STATE)
            names.append(TRAINING_STATE)
        for n in names:
            fsync_file(tmp / n)
        manifest["files"] = {
            n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in names
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json(tmp / MANIFEST, manifest)  # last: a directory without it is incomplete
    return Path(path)


def _version() -> str:
    from ._version import __version__

    return __version__


# ---------------------------------------------------------------------- load: read + check
def read_manifest(path) -> dict:
    """The manifest of the checkpoint at ``path`` (format, config, step, modules, files)."""
    directory, _ = resolve_checkpoint_dir(Path(path))
    return _read_manifest(directory)


def _read_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointMismatchError(
            f"{directory / MANIFEST} is not valid JSON ({e}): corrupted checkpoint"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{directory} is not an srlora checkpoint")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"checkpoint format version {manifest.get('format_version')}"
            f", this srlora reads version {FORMAT_VERSION}"
        )
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CheckpointMismatchError(
            f"{directory / MANIFEST} does not match its own checksum "
            "(manifest_sha256): it was edited or corrupted"
        )
    return manifest


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys), without its own checksum."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _read_files(directory: Path, manifest: dict) -> tuple[dict, dict, dict]:
    verify_files(directory, manifest["files"])
    try:
        saved_model = load_file(str(directory / MODEL_FILE))
        ctrl = join_tensors(
            json.loads((directory / CONTROLLER_JSON).read_text(encoding="utf-8")),
            load_file(str(directory / CONTROLLER_TENSORS)),
        )
        state = (
            torch.load(directory / TRAINING_STATE, weights_only=True, map_location="cpu")
            if TRAINING_STATE in manifest["files"]
            else {}
        )
    except CheckpointMismatchError:
        raise
    except Exception as e:  # unreadable despite matching checksums: written by something else
        raise CheckpointMismatchError(f"cannot read checkpoint {directory}: {e}") from e
    return saved_model, ctrl, state


def _check_config(manifest: dict, controller: SRLoRAController) -> None:
    check_config(manifest["config"], controller.config)  # the one saved-config check
    saved_mods = manifest["modules"]
    names = [L.name for L in controller.layers]
    if set(saved_mods) != set(names):
        raise CheckpointMismatchError(
            f"adapted modules differ: only in checkpoint {first(set(saved_mods) - set(names))}, "
            f"only in model {first(set(names) - set(saved_mods))}"
        )
    for L in controller.layers:
        s = saved_mods[L.name]
        if tuple(s["shape"]) != tuple(L.shape) or s["r"] != L.r:
            raise CheckpointMismatchError(
                f"module {L.name}: saved shape {tuple(s['shape'])} "
                f"rank {s['r']}, model has {tuple(L.shape)} rank {L.r}"
            )


def _check_model_tensors(saved: dict, live: dict) -> None:
    if set(saved) != set(live):
        raise CheckpointMismatchError(
            f"model tensors differ: only in checkpoint {first(set(saved) - set(live))}, only in "
            f"model {first(set(live) - set(saved))} (a different model or adapter config?)"
        )
    for k, t in live.items():
        s = saved[k]
        if tuple(s.shape) != tuple(t.shape) or s.dtype != t.dtype:
            raise CheckpointMismatchError(
                f"tensor {k}: saved {tuple(s.shape)} {s.dtype}, "
                f"model has {tuple(t.shape)} {t.dtype}"
            )


def _check_base(manifest: dict, model, controller: SRLoRAController, live: dict) -> None:
    saved_fp = manifest["base_fingerprint"]
    current = _fingerprinted(model, controller, live)
    if set(saved_fp) != set(current):
        raise CheckpointMismatchError(
            f"frozen weights differ: only in checkpoint {first(set(saved_fp) - set(current))}, "
            f"only in model {first(set(current) - set(saved_fp))}"
        )
    for name, p in current.items():
        now = _fingerprint(p)
        if any(
            abs(a - b) > 1e-6 * max(abs(a), abs(b)) + 1e-12 for a, b in zip(saved_fp[name], now)
        ):
            raise CheckpointMismatchError(
                f"frozen weight {name} differs from the one the checkpoint was saved on: load "
                "into a fresh srlora.wrap of the same base model"
            )


def _check_optimizer(osd: Optional[dict], inner: torch.optim.Optimizer, manifest: dict) -> None:
    if osd is None:
        raise CheckpointMismatchError(
            "an optimizer was given but the checkpoint holds no optimizer state"
        )
    if manifest["optimizer"] != type(inner).__name__:
        raise CheckpointMismatchError(
            f"optimizer differs: saved {manifest['optimizer']}, current {type(inner).__name__}"
        )
    groups, saved_groups = inner.param_groups, osd["param_groups"]
    if len(saved_groups) != len(groups):
        raise CheckpointMismatchError(
            f"optimizer has {len(groups)} parameter groups, the checkpoint {len(saved_groups)}"
        )
    for i, (sg, g) in enumerate(zip(saved_groups, groups)):
        if len(sg["params"]) != len(g["params"]):
            raise CheckpointMismatchError(
                f"optimizer group {i}: {len(g['params'])} parameters, "
                f"the checkpoint {len(sg['params'])}"
            )
    by_index = dict(
        zip(
            [i for sg in saved_groups for i in sg["params"]],
            [p for g in groups for p in g["params"]],
        )
    )
    for idx, st in osd["state"].items():
        p = by_index.get(idx)
        if p is None:
            raise CheckpointMismatchError(f"optimizer state for unknown parameter index {idx}")
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise CheckpointMismatchError(
                    f"optimizer state {k!r} of parameter {idx}: saved "
                    f"{tuple(v.shape)}, parameter {tuple(p.shape)}"
                )


def _check_scheduler(ssd: Optional[dict], scheduler, manifest: dict) -> None:
    if ssd is None:
        raise CheckpointMismatchError(
            "a scheduler was given but the checkpoint holds no scheduler state"
        )
    if manifest["scheduler"] != type(scheduler).__name__:
        raise CheckpointMismatchError(
            f"scheduler differs: saved {manifest['scheduler']}, current {type(scheduler).__name__}"
        )
    mine = scheduler.state_dict()
    if set(ssd) != set(mine):
        raise CheckpointMismatchError(
            f"scheduler state keys differ: saved {sorted(ssd)}, current {sorted(mine)}"
        )


def _sharded_optimizer_state(osd: dict, inner: torch.optim.Optimizer) -> dict:
    """``osd`` with each parameter-shaped state tensor of a DTensor parameter sharded like it
    (FSDP2); unchanged otherwise."""
    params = [p for g in inner.param_groups for p in g["params"]]
    if not any(is_dtensor(p) for p in params):
        return osd
    by_index = dict(zip([i for g in osd["param_groups"] for i in g["params"]], params))
    state = {
        idx: {
            k: shard_like(v, by_index[idx])
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == tuple(by_index[idx].shape)
            else v
            for k, v in st.items()
        }
        for idx, st in osd["state"].items()
    }
    return {**osd, "state": state}


# ---------------------------------------------------------------------- load
def load_checkpoint(
    path,
    *,
    model=None,
    controller: SRLoRAController,
    optimizer=None,
    scheduler=None,
    restore_rng: Optional[bool] = None,
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into freshly wrapped objects.

    The objects must be built as for the saved run: ``srlora.wrap`` of a fresh copy of the same
    base model with the same config, and an optimizer (and scheduler) built the same way. Every
    file, key, shape, dtype and the config are checked first; on any difference a
    CheckpointMismatchError names it and nothing has been changed. ``restore_rng``: None
    restores the saved RNG states if the checkpoint has them, True requires them, False leaves
    the current ones. Returns the manifest.
    """
    model = _resolve_model(model, controller)
    directory, recovered = resolve_checkpoint_dir(Path(path))
    if recovered:
        warnings.warn(
            f"{path} is missing (a save was interrupted while replacing it); loading "
            f"the previous checkpoint from {directory}",
            RuntimeWarning,
            stacklevel=2,
        )
    manifest = _read_manifest(directory)
    saved_model, ctrl, state = _read_files(directory, manifest)
    live = _saved_tensors(model, controller)
    _check_config(manifest, controller)
    _check_model_tensors(saved_model, live)
    _check_base(manifest, model, controller, live)
    controller.check_state_dict(ctrl)
    inner = unwrap_optimizer(optimizer) if optimizer is not None else None
    if inner is not None:
        _check_optimizer(state.get("optimizer"), inner, manifest)
    if scheduler is not None:
        _check_scheduler(state.get("scheduler"), scheduler, manifest)
    if restore_rng is None:
        restore_rng = "rng" in state
    if restore_rng and "rng" not in state:
        raise CheckpointMismatchError(
            "restore_rng=True but the checkpoint holds no RNG state (saved with rng=False)"
        )
    # everything checked: write (FSDP2: each rank its rows)
    with torch.no_grad():
        for k, t in live.items():
            copy_into_(t, saved_model[k])
    controller.load_state_dict(ctrl)
    if inner is not None:
        inner.load_state_dict(_sharded_optimizer_state(state["optimizer"], inner))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return manifest
