"""A small SRLoRA training run, shared by tests/test_distributed.py and its 2-process workers.

Importable (model, data, training loop, checkpoint helpers) and runnable as one rank:
    python tests/dist_worker.py --rank R --world-size 2 --init-method file:///tmp/store --out DIR
Each rank trains on its half of every global batch under DDP (gloo, CPU), with gradient
accumulation under no_sync(), checks the replicas at every switch, and saves under DIR: its
replica state at step SAVE_AT and at the end, the checkpoint at SAVE_AT (rank 0), and a JSON
report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import srlora
from srlora.distributed import (
    ReplicaMismatchError,
    assert_replicas_identical,
    default_svd_fn,
    replica_state,
    shared_svd_fn,
)

D_IN, D_H, D_OUT = 24, 32, 4
GLOBAL_BATCH = 16
ACCUM = 2  # micro-batches per optimizer step (gradient accumulation)
TOTAL_STEPS = 28  # switches after steps 4, 8, 12, 16, 20, 24
SAVE_AT = 14  # checkpoint between the third and fourth switch


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_H)
        self.fc2 = nn.Linear(D_H, D_H)
        self.head = nn.Linear(D_H, D_OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def config() -> srlora.SRLoRAConfig:
    # head (4 x 32) has K = r = 4 directions: it never switches (exhausted module, kept on purpose)
    return srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=16,
        gamma=0.5,
        total_steps=TOTAL_STEPS,
        target_modules=["fc1", "fc2", "head"],
        svd_method="randomized",
        svd_oversample=4,
    )


def build_base(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch for a step on every process: inputs and a fixed random teacher's labels."""
    teacher = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(123))
    x = torch.randn(GLOBAL_BATCH, D_IN, generator=torch.Generator().manual_seed(1000 + step))
    return x, (x @ teacher).argmax(dim=1)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )


def train_steps(
    model,
    optimizer,
    controller,
    start: int,
    stop: int,
    rank: int = 0,
    world: int = 1,
    on_switch=None,
    dtype=torch.float32,
) -> list[float]:
    """Steps [start, stop): each rank takes its contiguous share of the global batch, in ACCUM
    micro-batches; under DDP all but the last run in no_sync(), so the gradients are reduced once,
    before the optimizer step (and SRLoRA's hook) sees them."""
    b = GLOBAL_BATCH // world
    losses = []
    for step in range(start, stop):
        x, y = global_batch(step)
        xs, ys = (
            x[rank * b : (rank + 1) * b].chunk(ACCUM),
            y[rank * b : (rank + 1) * b].chunk(ACCUM),
        )
        loss = 0.0
        for j, (xj, yj) in enumerate(zip(xs, ys)):
            local = j < ACCUM - 1 and hasattr(model, "no_sync")
            with model.no_sync() if local else contextlib.nullcontext():
                part = F.cross_entropy(model(xj.to(dtype)).float(), yj) / ACCUM
                part.backward()
            loss += part.item()
        before = controller.num_switches
        controller.observe_loss(loss)  # this rank's loss; averaged over the ranks (adaptive only)
        optimizer.step()  # the controller's post-hook: importance, step count, switch
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if on_switch is not None and controller.num_switches != before:
            on_switch(step + 1)
    return losses


def new_run(svd_fn=None):
    peft_model, controller = srlora.wrap(build_base(), config(), svd_fn=svd_fn)
    optimizer = make_optimizer(peft_model)
    controller.attach(optimizer)
    return peft_model, controller, optimizer


def effective_weights(controller) -> list[torch.Tensor]:
    return [L.W().float() + L.scaling * L.B().float() @ L.A().float() for L in controller.layers]


# ---------------------------------------------------------------- checkpoint
def save_training_state(path: str, peft_model, controller, optimizer) -> None:
    """Rank 0 saves what a resume needs (every rank holds the same state)."""
    srlora.save_checkpoint(path, model=peft_model, controller=controller, optimizer=optimizer)


def load_training_state(path: str, peft_model, controller, optimizer) -> None:
    srlora.load_checkpoint(path, model=peft_model, controller=controller, optimizer=optimizer)


def snapshot(model, controller, optimizer) -> dict:
    return {
        k: v.detach().clone() if torch.is_tensor(v) else v
        for k, v in replica_state(model, controller, optimizer).items()
    }


# ---------------------------------------------------------------- one rank
def main(argv=None) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--init-method", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--hard-exit",
        action="store_true",
        help="os._exit(0) once done (forked workers: skips teardown of DDP/gloo "
        "objects, which can hang in a forked child)",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=a.init_method, rank=a.rank, world_size=a.world_size)
    rank, world, report = a.rank, a.world_size, {}

    assert default_svd_fn(config()) is not None, "wrap() must share the SVD under torch.distributed"
    svd = shared_svd_fn(config())
    peft_model, controller, optimizer = new_run(svd_fn=svd)
    report["svd"] = svd.stats
    before = effective_weights(controller)
    ddp = DDP(peft_model)
    checked = []

    def on_switch(step):
        checked.append((step, assert_replicas_identical(ddp, controller)))

    losses = train_steps(ddp, optimizer, controller, 0, SAVE_AT, rank, world, on_switch)
    torch.save(
        snapshot(ddp, controller, optimizer), os.path.join(a.out, f"state{SAVE_AT}_rank{rank}.pt")
    )
    if rank == 0:
        save_training_state(os.path.join(a.out, "ckpt"), peft_model, controller, optimizer)
    losses += train_steps(ddp, optimizer, controller, SAVE_AT, TOTAL_STEPS, rank, world, on_switch)
    torch.save(snapshot(ddp, controller, optimizer), os.path.join(a.out, f"final_rank{rank}.pt"))
    report.update(
        losses=losses,
        checked=checked,
        switches=controller.num_switches,
        change=[
            float((w - b).norm() / b.norm()) for w, b in zip(effective_weights(controller), before)
        ],
    )

    # bf16 base weights: the controller keeps an int8 residual of each weight's rounding
    bf_model, bf_ctl = srlora.wrap(
        build_base().to(torch.bfloat16), dataclasses.replace(config(), total_steps=12)
    )
    bf_opt = make_optimizer(bf_model)
    bf_ctl.attach(bf_opt)
    bf_ddp = DDP(bf_model)
    train_steps(bf_ddp, bf_opt, bf_ctl, 0, 12, rank, world, dtype=torch.bfloat16)
    report["bf16"] = {
        "switches": bf_ctl.num_switches,
        "checked": assert_replicas_identical(bf_ddp, bf_ctl),
    }
    torch.save(snapshot(bf_ddp, bf_ctl, bf_opt), os.path.join(a.out, f"bf16_rank{rank}.pt"))

    # adaptive schedule + refresh: each rank sees its own loss (the controller averages it over
    # the ranks) and each refresh's SVD is broadcast, so every rank fires the same switches and
    # appends the same directions
    ad_model, ad_ctl = srlora.wrap(
        build_base(),
        dataclasses.replace(
            config(),
            r_target=8,
            total_steps=16,
            switch_interval=2,
            switch_schedule="adaptive",
            exhaustion="refresh",
            adaptive_window=2,
            adaptive_settled=0.5,
        ),
    )
    ad_opt = make_optimizer(ad_model)
    ad_ctl.attach(ad_opt)
    ad_ddp = DDP(ad_model)
    ad_checked = []
    ad_losses = train_steps(
        ad_ddp,
        ad_opt,
        ad_ctl,
        0,
        16,
        rank,
        world,
        lambda step: ad_checked.append((step, assert_replicas_identical(ad_ddp, ad_ctl))),
    )
    report["adaptive_refresh"] = {
        "history": [[e["step"], e["reason"], e["refreshed"], e["slots"]] for e in ad_ctl.history],
        "checked": ad_checked,
        "pointers": ad_ctl.pointers,
        "losses": ad_losses,
    }

    # insertion="gradient": each rank's weight gradient is summed over the ranks and rank 0's
    # directions are broadcast, so every rank inserts the same directions
    gr_model, gr_ctl = srlora.wrap(
        build_base(), dataclasses.replace(config(), total_steps=12, insertion="gradient")
    )
    gr_opt = make_optimizer(gr_model)
    gr_ctl.attach(gr_opt)
    gr_ddp = DDP(gr_model)
    gr_checked = []
    train_steps(
        gr_ddp,
        gr_opt,
        gr_ctl,
        0,
        12,
        rank,
        world,
        lambda step: gr_checked.append((step, assert_replicas_identical(gr_ddp, gr_ctl))),
    )
    report["gradient"] = {
        "history": [[e["step"], e["gradient"], e["slots"]] for e in gr_ctl.history],
        "checked": gr_checked,
        "pointers": gr_ctl.pointers,
        "U": [st.U.sum().item() for st in gr_ctl.modules],
    }

    # the check must fail when one rank differs by one ulp in one element
    with torch.no_grad():
        if rank == 1:
            B = controller.layers[1].lora_B
            B.view(-1)[3] = torch.nextafter(B.view(-1)[3], torch.tensor(float("inf")))
    try:
        assert_replicas_identical(ddp, controller)
        report["perturbed"] = None
    except ReplicaMismatchError as e:
        report["perturbed"] = str(e)
    # ... and set-up must refuse ranks that loaded different weights
    base = build_base(seed=rank)
    try:
        srlora.wrap(base, config())
        report["diverged_inputs"] = None
    except ReplicaMismatchError as e:
        report["diverged_inputs"] = str(e)
    # ... and an SVD that fails on one rank must raise on every rank (no rank left waiting)
    import srlora.distributed as sd

    def broken(*args, **kwargs):
        raise RuntimeError("injected SVD failure")

    real = sd.top_singular_directions_many
    sd.top_singular_directions_many = broken if rank == 1 else real
    try:
        srlora.wrap(build_base(), config())
        report["svd_failure"] = None
    except RuntimeError as e:
        report["svd_failure"] = str(e)
    finally:
        sd.top_singular_directions_many = real
    with open(os.path.join(a.out, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    if a.hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
