"""Fine-tune a causal LM with SRLoRA under FSDP2 (fully_shard), launched by torchrun.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py --steps 14

CPU: gloo, one process per core. GPUs: nccl, one process per GPU. The default model is a tiny
randomly initialised Llama (same weights on every rank; seconds on a CPU); ``--model <local
folder or hub id>`` fine-tunes a real one (e.g. SmolLM2-135M). SRLoRA needs
``fusion="virtual"`` here: the frozen weights are sharded and never written; each rank keeps its
shard of the LoRA factors, of their optimizer state and of the importance state, and every
switch chooses the same slots on every rank (docs/distributed.md, "FSDP2").

The order that matters: srlora.wrap() on the whole model on every rank (a collective: the SVD
set-up is split and shared), then fully_shard (each decoder layer, then the root), then the
optimizer and attach(). At the end: a checkpoint (save_checkpoint on every rank, rank 0 writes),
the replica check, and a plain PEFT adapter exported from the sharded run.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import srlora
from srlora.fsdp import unsharded

TEXTS = [
    "the cat sat on the mat",
    "a dog ran under the big table",
    "the red bird sings in the morning",
    "my small cat sleeps on the warm rug",
    "the old man reads a book by the fire",
    "a child plays with a blue ball",
    "the sun sets behind the green hills",
    "we walk to the river after dinner",
    "the train leaves the station at noon",
    "he drinks hot tea in the garden",
    "the fish swim in the cold lake",
    "they build a house near the sea",
    "the moon shines over the quiet town",
    "a cook makes bread for the village",
]


def tiny_llama():
    """A 2-layer Llama (hidden 64) and a word-level encoder over TEXTS; same weights each call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = {w: i + 1 for i, w in enumerate(sorted({w for t in TEXTS for w in t.split()}))}
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab) + 1,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
    )

    def encode(texts):
        ids = [[vocab[w] for w in t.split()] for t in texts]
        n = max(map(len, ids))
        return torch.tensor([x + [0] * (n - len(x)) for x in ids])

    return model, encode


def hub_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, lambda texts: tok(texts, padding=True, return_tensors="pt")["input_ids"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4, help="per rank")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--model", default=None, help="local folder or hub id (default: tiny Llama)")
    ap.add_argument("--out", default=None, help="checkpoint and adapter folder (default: temp)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    base, encode = hub_model(args.model) if args.model else tiny_llama()
    base = base.to(device) if cuda else base

    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=16,
        gamma=0.5,
        fusion="virtual",
        target_modules=["q_proj", "v_proj"],
        total_steps=args.steps,
    )
    model, controller = srlora.wrap(base, cfg)  # every rank, on the whole model
    for m in model.modules():  # FSDP2: each decoder layer, then the root
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    controller.attach(optimizer)  # binds to the shards: sharded importance, gathered switches

    order = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(0)).tolist()
    for step in range(args.steps):
        g = [
            TEXTS[order[(step * args.batch_size * world + j) % len(TEXTS)]]
            for j in range(args.batch_size * world)
        ]
        ids = encode(g[rank * args.batch_size : (rank + 1) * args.batch_size])
        ids = ids.to(device) if cuda else ids
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=0
        )
        loss.backward()
        optimizer.step()  # SRLoRA's post-hook: importance, step count, switch when scheduled
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step % 4 == 0 or step == args.steps - 1):
            print(
                f"step {step + 1:3d}  loss {loss.item():.4f}  switches {controller.num_switches}",
                flush=True,
            )

    out = args.out or tempfile.mkdtemp(prefix="srlora-fsdp2-") if rank == 0 else None
    holder = [out]
    dist.broadcast_object_list(holder)
    out = holder[0]
    srlora.save_checkpoint(
        os.path.join(out, "ckpt"), model=model, controller=controller, optimizer=optimizer
    )  # every rank: gathered, rank 0 writes
    n = srlora.distributed.assert_replicas_identical(model, controller)  # raises on every rank
    with unsharded(model):  # every rank; rank 0 writes a plain PEFT adapter
        if rank == 0:
            srlora.export_adapter(model, controller, os.path.join(out, "adapter"))
    if rank == 0:
        print(f"checkpoint and adapter in {out}")
        print(
            f"replicas identical: {n} SRLoRA state entries bitwise equal on {world} ranks after "
            f"{controller.global_step} optimizer steps and {controller.num_switches} switches",
            flush=True,
        )
    dist.barrier()  # every rank done before the group goes
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
