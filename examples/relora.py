"""ReLoRA (Lialin et al. 2023, arXiv 2307.05695) with srlora: ``SRLoRAConfig(method="relora")``
merges every LoRA pair into the frozen weight at each restart, restarts the slots as LoRA's init
(B zero, A random) and magnitude-prunes their optimizer state. ReLoRA's jagged cosine learning
rate (a cosine decay over the run whose value drops to zero at every restart and warms up again
over ``restart_warmup`` steps) is an ordinary scheduler you pass to your training loop:
:func:`jagged_cosine` below (ReLoRA's ``get_cosine_schedule_with_multiple_warmups``).

    python examples/relora.py
"""

import math

import torch
from torch import nn

import srlora


def jagged_cosine_lambda(
    step: int,
    *,
    total_steps: int,
    restart_every: int,
    warmup: int,
    restart_warmup: int,
    min_lr_ratio: float = 0.1,
) -> float:
    """ReLoRA's lr multiplier after ``step`` scheduler steps: a linear warmup over ``warmup``
    steps, then a cosine from 1 to ``min_lr_ratio`` over the run; after each restart (every
    ``restart_every`` steps) it restarts from 0 and rises linearly over ``restart_warmup`` steps
    to the cosine's value at the end of that warmup."""
    if step < warmup:
        return step / max(1, warmup)

    def cosine(at: int) -> float:
        progress = (at - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    since = step % restart_every
    if since < restart_warmup and step >= restart_every:
        end = (step // restart_every) * restart_every + restart_warmup
        return since / max(1, restart_warmup) * cosine(end)
    return cosine(step)


def jagged_cosine(optimizer, **kw) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with :func:`jagged_cosine_lambda` (keyword arguments as there)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: jagged_cosine_lambda(s, **kw))


def main(steps: int = 60, restart_every: int = 15, seed: int = 0):
    """Train a tiny regression with ReLoRA; returns (model, controller, per-step lrs, losses)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    config = srlora.SRLoRAConfig(
        method="relora",
        r=4,
        lora_alpha=8,
        target_modules=["0", "2"],
        switch_interval=restart_every,
        total_steps=steps,
    )
    model, controller = srlora.wrap(net, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    scheduler = jagged_cosine(
        optimizer, total_steps=steps, restart_every=restart_every, warmup=5, restart_warmup=3
    )
    controller.attach(optimizer)  # restarts happen inside optimizer.step(), on schedule
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(16, 4, generator=g)
    lrs, losses = [], []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        loss = (model(x) - x @ target).pow(2).mean()
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return model, controller, lrs, losses


if __name__ == "__main__":
    _, ctl, lrs, losses = main()
    print(
        f"{ctl.num_switches} restarts at steps {ctl.switch_steps}; loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; lr after each restart: "
        f"{[round(lrs[s], 5) for s in ctl.switch_steps]}"
    )
