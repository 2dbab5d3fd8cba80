"""``SRLoRACallback``: SRLoRA inside a Hugging Face ``Trainer`` with no other change to the script.

What the Trainer does, and what the callback adds (transformers 5.x ``Trainer.train``):

- ``train(resume_from_checkpoint=...)`` loads the adapter (LoRA factors, modules_to_save), the
  optimizer, scheduler and RNG states, and only then calls ``on_train_begin``. The callback
  then reads ``max_steps`` (``controller.set_total_steps``), restores what the Trainer does not
  know about (the adapted base weights and the controller's state, from
  ``<checkpoint>/srlora``), and attaches the controller to the optimizer the Trainer hands in
  (an accelerate ``AcceleratedOptimizer``; ``attach`` hooks the inner torch optimizer).
- Per optimizer step the Trainer clips the gradients, then calls ``optimizer.step()``: the
  controller's step post-hook runs there, on the clipped gradients, once per real optimizer
  step (gradient accumulation micro-batches do not step the optimizer).
- ``on_log`` passes the logged training loss to ``controller.observe_loss`` (the adaptive
  schedule's plateau test; every ``logging_steps`` steps).
- ``on_save`` runs right after the Trainer wrote ``<output_dir>/checkpoint-<global_step>``; the
  callback adds ``srlora/`` to it (``srlora.save_checkpoint``, without optimizer and RNG,
  which the Trainer keeps itself).
- With ``load_best_model_at_end`` the Trainer reloads only the best adapter; ``on_train_end``
  reloads the matching fused state.

A resumed run whose fused state cannot be found raises instead of training on a model whose
base weights do not match its adapter.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from .._errors import CheckpointMismatchError
from ..checkpoint import load_checkpoint, read_manifest, save_checkpoint
from ..controller import SRLoRAController
from ..guards import release

SUBDIR = "srlora"


def _trainer_resume_path() -> Optional[str]:
    """The ``resume_from_checkpoint`` the running ``Trainer._inner_training_loop`` was given.

    Callbacks are not told the path; ``on_train_begin`` is called from that loop, so it is read
    from the caller's frame. None if it cannot be found (then output_dir is searched).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop":
                value = frame.f_locals.get("resume_from_checkpoint")
                return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
            frame = frame.f_back
        return None
    finally:
        del frame


class SRLoRACallback(TrainerCallback):
    """Drive an :class:`SRLoRAController` from a ``transformers.Trainer``.

    ``Trainer(model=peft_model, ..., callbacks=[SRLoRACallback(controller)])``. ``resume_from``
    names the checkpoint directory explicitly, for layouts the callback cannot find itself.
    """

    def __init__(self, controller: SRLoRAController, resume_from: Optional[str] = None):
        if not isinstance(controller, SRLoRAController):
            raise TypeError(
                f"SRLoRACallback needs an SRLoRAController, got {type(controller).__name__}"
            )
        self.controller = controller
        self.resume_from = resume_from

    # ------------------------------------------------------------------ where the state is
    def _resume_dir(self, args, state) -> Path:
        step = state.global_step
        tried = []
        for base in (
            self.resume_from,
            _trainer_resume_path(),
            os.path.join(args.output_dir, f"checkpoint-{step}"),
        ):
            if base is None:
                continue
            for cand in (Path(base) / SUBDIR, Path(base)):
                tried.append(str(cand))
                try:
                    manifest = read_manifest(cand)
                except (FileNotFoundError, CheckpointMismatchError):
                    continue
                saved_at = manifest.get("extra", {}).get("trainer_global_step")
                if saved_at != step:
                    raise CheckpointMismatchError(
                        f"SRLoRA state in {cand} was saved at Trainer step {saved_at}, but the "
                        f"Trainer resumes at step {step}"
                    )
                return cand
        raise CheckpointMismatchError(
            f"resuming at Trainer step {step}, but no SRLoRA state was found (looked in "
            f"{tried}). The Trainer restores only the adapter; without the fused base weights "
            "and the controller state the run cannot continue correctly. Resume from a "
            "checkpoint saved with SRLoRACallback, or pass SRLoRACallback(controller, "
            "resume_from=<checkpoint dir>)"
        )

    def _load(self, directory: Path) -> None:
        ctl = self.controller
        load_checkpoint(directory, model=ctl.model, controller=ctl, restore_rng=False)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ctl = self.controller
        if model is not None and model is not ctl.model:
            raise ValueError(
                "SRLoRACallback: the Trainer trains another model than the one "
                "the controller adapts (pass the PeftModel from srlora.wrap)"
            )
        if optimizer is None:
            raise ValueError("SRLoRACallback: the Trainer handed no optimizer to on_train_begin")
        if state.global_step > 0:
            self._load(self._resume_dir(args, state))
        elif ctl.global_step != 0:
            raise ValueError(
                f"SRLoRACallback: the controller has already counted "
                f"{ctl.global_step} optimizer steps but the Trainer starts at step "
                "0; wrap a fresh model for a new run, or resume from a checkpoint"
            )
        ctl.set_total_steps(int(state.max_steps))
        release(ctl)  # the Trainer's (possibly new) optimizer replaces the one this hooked
        ctl.attach(optimizer)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The Trainer's logged training loss (every ``logging_steps``, already averaged over
        the processes) feeds ``switch_schedule="adaptive"``'s plateau test."""
        if logs and "loss" in logs and self.controller.schedule is not None:
            self.controller.observe_loss(float(logs["loss"]))
        return control

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the process(es) the Trainer saves on
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not os.path.isdir(ckpt):
                raise FileNotFoundError(
                    f"SRLoRACallback: the Trainer's checkpoint {ckpt} does "
                    "not exist; cannot add the SRLoRA state to it"
                )
            ctl = self.controller
            save_checkpoint(
                os.path.join(ckpt, SUBDIR),
                model=ctl.model,
                controller=ctl,
                rng=False,
                extra={"trainer_global_step": state.global_step},
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:
            directory = Path(best) / SUBDIR
            if not (directory / "manifest.json").is_file():
                raise CheckpointMismatchError(
                    f"the Trainer reloaded the best adapter from {best}, which holds no SRLoRA "
                    "state; the model's base weights would not match it"
                )
            self._load(directory)
        return control
