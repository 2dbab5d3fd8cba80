"""A small SRLoRA run under FSDP2 (fully_shard), shared by tests/test_fsdp2.py and its workers.

Importable (model, config, training loop, whole-state snapshot) and runnable as one rank:
    python tests/fsdp_worker.py --rank R --world-size 2 --init-method file:///tmp/store --out DIR
Each rank wraps the whole model (the SVD set-up shared), shards it with fully_shard (each adapted
layer, then the root), trains on its half of every global batch, checks the replicas at every
switch, saves the checkpoint at SAVE_AT (every rank calls save_checkpoint, rank 0 writes), keeps
training to TOTAL_STEPS, then resumes a second sharded run from the checkpoint and trains it to
TOTAL_STEPS too. Under DIR: the whole state of each phase per rank and a JSON report.

r = 3 over 2 ranks shards lora_A unevenly (rows 0-1 / 2) and the head's 5 outputs too (3 / 2);
``importance_reset="slots"`` resets single rows of the sharded importance state.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import srlora
import srlora.fsdp
from srlora.distributed import assert_replicas_identical, replica_state

D_IN, D_H, D_OUT = 24, 30, 5
GLOBAL_BATCH = 16
ACCUM = 2  # micro-batches per optimizer step
TOTAL_STEPS = 24  # r=3, r'=2, K=16: 6 switches, after steps 3, 6, ..., 18
SAVE_AT = 10


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_H)
        self.fc2 = nn.Linear(D_H, D_H)
        self.head = nn.Linear(D_H, D_OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def config() -> srlora.SRLoRAConfig:
    return srlora.SRLoRAConfig(
        r=3,
        lora_alpha=6,
        r_target=16,
        gamma=0.5,
        total_steps=TOTAL_STEPS,
        target_modules=["fc1", "fc2", "head"],
        fusion="virtual",
        importance_reset="slots",
        svd_method="randomized",
        svd_oversample=4,
    )


def build_base(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(123))
    x = torch.randn(GLOBAL_BATCH, D_IN, generator=torch.Generator().manual_seed(1000 + step))
    return x, (x @ teacher).argmax(dim=1)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )


def new_run(shard: bool):
    """wrap (every rank, the SVD shared), then fully_shard each adapted layer and the root."""
    model, controller = srlora.wrap(build_base(), config())
    if shard:
        from torch.distributed.fsdp import fully_shard

        for L in controller.layers:
            fully_shard(L.layer)
        fully_shard(model)
    optimizer = make_optimizer(model)
    controller.attach(optimizer)
    return model, controller, optimizer


def train_steps(
    model,
    optimizer,
    controller,
    start: int,
    stop: int,
    rank: int = 0,
    world: int = 1,
    on_switch=None,
) -> list[float]:
    """Steps [start, stop): each rank takes its contiguous share of the global batch, in ACCUM
    micro-batches (FSDP2 reduce-scatters the mean gradient into the shards)."""
    b = GLOBAL_BATCH // world
    losses = []
    for step in range(start, stop):
        x, y = global_batch(step)
        xs, ys = (
            x[rank * b : (rank + 1) * b].chunk(ACCUM),
            y[rank * b : (rank + 1) * b].chunk(ACCUM),
        )
        loss = 0.0
        for xj, yj in zip(xs, ys):
            part = F.cross_entropy(model(xj), yj) / ACCUM
            part.backward()
            loss += part.item()
        before = controller.num_switches
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if on_switch is not None and controller.num_switches != before:
            on_switch(step + 1)
    return losses


def whole_state(model, controller, optimizer) -> dict:
    """Every SRLoRA tensor and value, whole (gathered under FSDP2), copied to the CPU."""
    return {
        k: v.detach().cpu().clone() if torch.is_tensor(v) else copy.deepcopy(v)
        for k, v in replica_state(model, controller, optimizer).items()
    }


def main(argv=None) -> int:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--init-method", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hard-exit", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=a.init_method, rank=a.rank, world_size=a.world_size)
    rank, world, out = a.rank, a.world_size, a.out
    model, controller, optimizer = new_run(shard=True)
    report: dict = {
        "local_rows_A": [list(srlora.fsdp.local_rows(L.lora_A)) for L in controller.layers]
    }
    checked = []

    def on_switch(step):
        checked.append((step, assert_replicas_identical(model, controller)))

    losses = train_steps(model, optimizer, controller, 0, SAVE_AT, rank, world, on_switch)
    torch.save(whole_state(model, controller, optimizer), os.path.join(out, f"save_rank{rank}.pt"))
    srlora.save_checkpoint(
        os.path.join(out, "ckpt"), model=model, controller=controller, optimizer=optimizer
    )  # every rank; rank 0 writes
    losses += train_steps(
        model, optimizer, controller, SAVE_AT, TOTAL_STEPS, rank, world, on_switch
    )
    torch.save(whole_state(model, controller, optimizer), os.path.join(out, f"final_rank{rank}.pt"))
    report.update(
        losses=losses, checked=checked, switches=controller.num_switches, history=controller.history
    )
    final = whole_state(model, controller, optimizer)
    with srlora.fsdp.unsharded(model):  # every rank; rank 0 exports from the whole factors
        report["unsharded_types"] = sorted({type(L.lora_A).__name__ for L in controller.layers})
        if rank == 0:
            srlora.export_adapter(model, controller, os.path.join(out, "adapter"))
    after = whole_state(model, controller, optimizer)
    report["export_changed"] = [
        k
        for k in final
        if not (
            torch.equal(after[k], final[k]) if torch.is_tensor(final[k]) else after[k] == final[k]
        )
    ]
    report["resharded_types"] = sorted({type(L.lora_A).__name__ for L in controller.layers})

    # resume a fresh sharded run from the checkpoint the sharded run saved
    model2, controller2, optimizer2 = new_run(shard=True)
    srlora.load_checkpoint(
        os.path.join(out, "ckpt"), model=model2, controller=controller2, optimizer=optimizer2
    )
    torch.save(
        whole_state(model2, controller2, optimizer2), os.path.join(out, f"loaded_rank{rank}.pt")
    )
    train_steps(model2, optimizer2, controller2, SAVE_AT, TOTAL_STEPS, rank, world)
    torch.save(
        whole_state(model2, controller2, optimizer2), os.path.join(out, f"resumed_rank{rank}.pt")
    )
    report["resumed_history"] = controller2.history
    # fusion="weight" under FSDP2 is refused at attach, naming fusion="virtual"
    m3, c3 = srlora.wrap(build_base(), dataclasses.replace(config(), fusion="weight"))
    from torch.distributed.fsdp import fully_shard

    fully_shard(m3)
    try:
        c3.attach(make_optimizer(m3))
        report["weight_refused"] = None
    except srlora.UnsupportedEngineError as e:
        report["weight_refused"] = str(e)
    with open(os.path.join(out, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    if a.hard_exit:
        os._exit(0)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
