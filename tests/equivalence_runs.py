"""Training runs shared by the equivalence test and its golden-file generator.

Self-contained (no conftest, no srlora_lab): ``tests/data/make_equivalence_golden.py`` runs these
with the code of commit c7bf1de and writes what they produced into tests/data/; the test
(tests/test_equivalence.py) runs them with the current code and compares. Each run trains a tiny
two-linear model for ``STEPS`` AdamW steps on seeded batches under one SRLoRAConfig and returns
the switch history, the pointers, the per-step losses and the output on a fixed batch.
"""

from __future__ import annotations

import torch
from torch import nn

STEPS = 30
BASE = dict(
    r=4,
    lora_alpha=8,
    r_target=12,
    gamma=0.5,
    target_modules=["query", "value"],
    total_steps=STEPS,
    svd_method="exact",
)

# name -> (SRLoRAConfig fields over BASE, base dtype); every variant field that exists at c7bf1de
CONFIGS = {
    "paper": ({}, "float32"),
    "selection-protect": ({"selection": "protect"}, "float32"),
    "selection-normalized": ({"selection": "normalized"}, "float32"),
    "insertion-gradient": ({"insertion": "gradient"}, "float32"),
    "schedule-adaptive": ({"switch_schedule": "adaptive", "adaptive_window": 2}, "float32"),
    "adaptive-normalized": (
        {"switch_schedule": "adaptive", "adaptive_window": 3, "selection": "normalized"},
        "float32",
    ),
    "switch-interval": ({"switch_interval": 3}, "float32"),
    "switch-span": ({"switch_span": 0.5}, "float32"),
    "exhaustion-refresh": ({"exhaustion": "refresh", "r_target": 8}, "float32"),
    "refresh-interval": ({"exhaustion": "refresh", "r_target": 8, "switch_interval": 4}, "float32"),
    "refresh-adaptive": (
        {
            "exhaustion": "refresh",
            "r_target": 8,
            "switch_schedule": "adaptive",
            "adaptive_window": 2,
            "switch_interval": 3,
        },
        "float32",
    ),
    "optimizer-keep": ({"optimizer_state": "keep"}, "float32"),
    "optimizer-rewarm": ({"optimizer_state": "rewarm"}, "float32"),
    "importance-slots": ({"importance_reset": "slots"}, "float32"),
    "betas": ({"beta1": 0.5, "beta2": 0.7}, "float32"),
    "fusion-virtual": ({"fusion": "virtual"}, "float32"),
    "virtual-refresh": (
        {"fusion": "virtual", "exhaustion": "refresh", "r_target": 8, "switch_interval": 4},
        "float32",
    ),
    "svd-randomized": (
        {"svd_method": "randomized", "svd_oversample": 4, "svd_niter": 2, "svd_seed": 3},
        "float32",
    ),
    "half-residual": ({"half_fusion": "residual"}, "bfloat16"),
    "half-original": ({"half_fusion": "original"}, "bfloat16"),
    "half-inplace": ({"half_fusion": "inplace"}, "bfloat16"),
    "half-residual-refresh": (
        {"half_fusion": "residual", "exhaustion": "refresh", "r_target": 8},
        "bfloat16",
    ),
    "offload-none": ({"offload_device": None, "selection": "protect"}, "float32"),
    "dropout-alpha": ({"lora_dropout": 0.1, "lora_alpha": 3.0, "gamma": 0.75}, "float32"),
    "pissa": ({"method": "pissa"}, "float32"),
    "pissa-virtual": ({"method": "pissa", "fusion": "virtual"}, "float32"),
    "lora": ({"method": "lora"}, "float32"),
}
CHECKPOINTED = ("paper", "refresh-adaptive", "optimizer-rewarm")  # saved at CKPT_STEP by c7bf1de
CKPT_STEP = 13


class TwoLinear(nn.Module):
    """Two adaptable linears (named like BERT's attention projections) and a head."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.query = nn.Linear(16, 12, dtype=dtype)
        self.value = nn.Linear(12, 16, dtype=dtype)
        self.head = nn.Linear(16, 3, dtype=dtype)

    def forward(self, x):
        return self.head(self.value(torch.tanh(self.query(x))))


def build(name: str):
    """The wrapped model, its controller (attached) and AdamW, from seed 0."""
    import srlora

    fields, dtype = CONFIGS[name]
    torch.manual_seed(0)
    base = TwoLinear(getattr(torch, dtype))
    model, ctl = srlora.wrap(base, srlora.SRLoRAConfig(**(BASE | fields)))
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01
    )
    ctl.attach(opt)
    return model, ctl, opt


def batch(step: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 16, generator=g).to(dtype)
    y = torch.randint(0, 3, (8,), generator=g)
    return x, y


def train(model, ctl, opt, start: int, stop: int) -> list[float]:
    """Steps ``start+1 .. stop``; dropout draws from a generator seeded per step."""
    dtype = model.base_model.model.query.weight.dtype if hasattr(model, "base_model") else None
    losses = []
    for t in range(start, stop):
        torch.manual_seed(77 + t)
        x, y = batch(t, dtype)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        ctl.observe_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def probe_output(model) -> list[float]:
    model.eval()
    x, _ = batch(-1, model.base_model.model.query.weight.dtype)
    with torch.no_grad():
        out = model(x).float().reshape(-1).tolist()
    model.train()
    return out


def summary(model, ctl, losses: list[float]) -> dict:
    """What the equivalence compares: switch history, pointers, losses, outputs."""
    hist = []
    for e in ctl.history:
        hist.append({k: v for k, v in e.items()})
    return {
        "history": hist,
        "pointers": ctl.pointers,
        "global_step": ctl.global_step,
        "num_switches": ctl.num_switches,
        "losses": losses,
        "output": probe_output(model),
    }


def run(name: str) -> dict:
    model, ctl, opt = build(name)
    losses = train(model, ctl, opt, 0, STEPS)
    return summary(model, ctl, losses)
