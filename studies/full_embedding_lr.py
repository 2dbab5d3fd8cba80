"""Why the two-seed pre-read of full fine-tuning on bbc-lm (shared/docs/evidence.md: test loss
3.26 against LoRA r 8's 3.57) is not what the headroom study measures (3.64 against 3.61).

One guess was that the pre-read trained SmolLM2's tied embedding / output matrix at a higher lr
(the classification tasks' head lr, 1e-3) than the rest. This runs one selection-style run of
the headroom study's bbc-lm task (30 steps, seed 100, its settings read from the committed
spec.json) with every weight at LR but the tied embedding at EMB_LR, and prints the validation
loss the study's lr choice reads (exploratory: one seed, not part of any study).

    python studies/full_embedding_lr.py 1e-3 1e-4      # EMB_LR LR [STEPS] [SEED]
    python studies/full_embedding_lr.py --base         # the untrained model's test loss
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from srlora_lab.experiments import runner, study_jobs  # noqa: E402

SPEC = os.path.join(os.path.dirname(__file__), "results", "headroom", "spec.json")


def with_embedding_lr(emb_lr: float):
    """runner.full_model with the tied embedding (and output) matrix in its own group."""
    plain = runner.full_model

    def full_model(bundle, model, lr, head_lr, target_modules):
        model, ctl, groups, initial = plain(bundle, model, lr, head_lr, target_modules)
        emb = [p for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n]
        ids = {id(p) for p in emb}
        rest = [p for g in groups for p in g["params"] if id(p) not in ids]
        return model, ctl, [{"params": rest, "lr": lr}, {"params": emb, "lr": emb_lr}], initial

    return full_model


def base_loss(task: dict) -> dict:
    """The untrained model on the study's whole test part (what every run starts from)."""
    bundle, enc, split, _ = study_jobs.prepare(task)
    test = runner._units(bundle, enc, split.test)
    return runner.evaluate(bundle, bundle.make(0), enc, test)


def main(argv: list[str]) -> None:
    task = next(t for t in json.load(open(SPEC))["tasks"] if t["name"] == "bbc-lm")
    if argv[:1] == ["--base"]:
        ev = base_loss(task)
        print(
            f"untrained SmolLM2 on bbc-lm's test part: test loss {ev['loss']:.4f}, next-token "
            f"accuracy {100 * ev['accuracy']:.2f}%, perplexity {ev['perplexity']:.2f}"
        )
        return
    emb_lr, lr = float(argv[0]), float(argv[1])
    steps = int(argv[2]) if len(argv) > 2 else 30
    seed = int(argv[3]) if len(argv) > 3 else 100
    runner.full_model = with_embedding_lr(emb_lr)
    with tempfile.TemporaryDirectory() as d:
        job = {
            "task": task,
            "method": {"name": "full", "method": "full", "config": {}},
            "seed": seed,
            "lr": lr,
            "steps": steps,
            "file": os.path.join(d, "run.json"),
        }
        rec = study_jobs.execute(job)
    print(
        f"full fine-tuning, embedding lr {emb_lr:g}, other weights {lr:g}, {steps} steps, "
        f"seed {seed}: val loss {rec['val_loss']:.4f}, test loss {rec['final_test_loss']:.4f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
