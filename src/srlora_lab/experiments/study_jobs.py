"""One study job: prepare a task once per process, train one run, write its record atomically.

A job is a plain dict (picklable, for spawned workers): the resolved task, the method, the
learning rate, steps and seed, the output file. :func:`execute` runs it with
``runner.run_one`` (the same record ``srlora compare`` makes) plus a validation curve taken by
the run's callback, writes ``<file>`` atomically and returns the record. A run whose loss turns
non-finite (a learning rate too large) is recorded as failed, not raised: in the grid that is a
result.
"""

from __future__ import annotations

import os

_PREPARED: dict = {}  # task name -> (bundle, enc, split, meta), per process


class TaskError(Exception):
    """A task's data or model cannot be loaded, or an adapter does not fit it."""


def prepare(task: dict, device: str = "cpu"):
    """Load a task's data and model (cached per process): (bundle, enc, split, meta)."""
    key = (task["name"], device)
    if key in _PREPARED:
        return _PREPARED[key]
    from . import tasks
    from .assets import AssetError
    from .models import ModelError, load_model

    try:
        data = (
            tasks.load_table(task["dataset"])
            if task.get("dataset")
            else tasks.TASKS[task["name"]].loader()
        )
        sp = tasks.split(
            data,
            task["split_seed"] if task.get("split_seed") is not None else 0,
            max_train=task.get("max_train"),
            max_val=task.get("max_val"),
            max_test=task.get("max_test"),
        )
        bundle = load_model(
            task["model"], data.kind, len(data.label_names), task.get("target_modules")
        )
        enc = bundle.encode(
            data, max_len=task.get("max_len") or 64, image_size=task.get("image_size") or 64
        )
    except (tasks.DataError, ModelError, AssetError) as e:
        raise TaskError(f"task {task['name']!r}: {e}") from None
    if device != "cpu":
        bundle.base.to(device)
        enc = _OnDevice(enc, device)
    meta = {
        "data": {
            "source": data.source,
            "kind": data.kind,
            "labels": data.label_names,
            "examples": len(data),
        },
        "split": sp.info,
        "model": {
            "name": bundle.name,
            "target_modules": task.get("target_modules") or bundle.target_modules,
            "trained_head": bundle.head,
        },
    }
    _PREPARED[key] = (bundle, enc, sp, meta)
    return _PREPARED[key]


def forget() -> None:
    """Drop this process's loaded tasks (the parent's, once workers take over)."""
    _PREPARED.clear()


class _OnDevice:
    """An encoded dataset whose batches land on ``device``."""

    def __init__(self, enc, device: str):
        self.enc, self.device, self.lengths = enc, device, enc.lengths

    def batch(self, idx):
        inputs, labels = self.enc.batch(idx)
        if isinstance(inputs, dict):
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
        else:
            inputs = inputs.to(self.device)
        return inputs, labels.to(self.device)


def check_adapters(task: dict, methods: list[dict], device: str = "cpu") -> None:
    """Wrap the task's model once per method (seed 0): an adapter that does not fit raises."""
    import srlora

    from . import runner
    from .runner import adapter_config

    bundle = prepare(task, device)[0]
    for m in methods:
        if m["method"] == runner.FULL:  # no adapter to fit
            continue
        try:
            cfg = adapter_config(
                bundle,
                method=m["method"],
                r=task["r"],
                lora_alpha=task["lora_alpha"],
                r_target=task["r_target"],
                gamma=task["gamma"],
                steps=task["steps"],
                target_modules=task.get("target_modules"),
                config=m["config"],
            )
            srlora.wrap(bundle.make(0), cfg)
        except (srlora.SRLoRAError, ValueError, TypeError) as e:
            raise TaskError(
                f"task {task['name']!r}, method {m['name']!r}: the adapter does not "
                f"fit model {bundle.name!r}: {e}"
            ) from None


def write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    import json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def execute(job: dict) -> dict:
    """Train the run ``job`` describes, write its record to ``job["file"]``, return it."""
    from . import runner

    task, method = job["task"], job["method"]
    device = job.get("device", "cpu")
    bundle, enc, sp, _ = prepare(task, device)
    steps, every = job["steps"], min(task["eval_every"], job["steps"])
    val_idx = sp.val[: task["eval_size"]] if task.get("eval_size") else sp.val
    val_curve = []

    def on_step(step, model, controller, optimizer, scheduler):
        if step % every == 0 or step == steps:
            ev = runner.evaluate(bundle, model, enc, val_idx)
            val_curve.append({"step": step, "accuracy": ev["accuracy"], "loss": ev["loss"]})

    ident = {"task": task["name"], "name": method["name"]}
    try:
        rec = runner.run_one(
            bundle,
            enc,
            sp,
            method=method["method"],
            seed=job["seed"],
            lr=job["lr"],
            steps=steps,
            batch_size=task["batch_size"],
            r=task["r"],
            lora_alpha=task["lora_alpha"],
            r_target=task["r_target"],
            gamma=task["gamma"],
            target_modules=task.get("target_modules"),
            eval_every=every,
            eval_size=task.get("eval_size"),
            warmup=task["warmup"] if task.get("warmup") is not None else 0.1,
            schedule=task.get("schedule") or "constant",
            head_lr=task.get("head_lr"),
            eval_val=True,
            callback=on_step,
            progress=job.get("progress", False),
            desc=job.get("desc", ""),
            config=method["config"],
        )
        rec.update(ident, val_curve=val_curve, failed=False)
    except FloatingPointError as e:  # diverged: a result of the lr grid, not a crash
        from .fingerprint import machine_fingerprint

        rec = {
            **ident,
            "method": method["method"],
            "seed": job["seed"],
            "lr": job["lr"],
            "steps": steps,
            "failed": True,
            "error": str(e),
            "config": method["config"],
            "fingerprint": machine_fingerprint(device=device),
        }
    from .records import compact_record, seal

    rec = seal(rec if job.get("full_records") else compact_record(rec))
    write_json(job["file"], rec)
    return rec


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Start a daemon thread that ends this process (``os._exit(1)``) once ``parent`` is no
    longer its parent: a study killed with SIGKILL or SIGTERM, whose pool never shut down, then
    leaves no worker behind (the run in progress is lost; its file is written atomically, so
    nothing half-written is left and ``--resume`` reruns it)."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="srlora-exit-with-parent", daemon=True).start()


def init_worker(threads: int, gpus, parent: int | None = None) -> None:
    """A spawned worker's set-up: its thread budget, with a GPU queue its own GPU, and with
    ``parent`` (the study's pid) an exit when the study dies (:func:`exit_with_parent`)."""
    if parent is not None:
        exit_with_parent(parent)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    import torch

    torch.set_num_threads(threads)
