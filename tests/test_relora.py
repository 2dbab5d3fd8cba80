"""ReLoRA (Lialin et al. 2023) built from the switch's strategies and configuration only:
``SRLoRAConfig(method="relora")`` = gamma 1 (every pair), insertion "lora" (B zero, A
kaiming-uniform), optimizer_state "prune" (magnitude pruning), exhaustion "extend" (restarts to
the end of the run). Resume and export are tested with every other method in test_checkpoint.py
and test_export.py."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import TinyNet, rel

import srlora
from srlora.strategies.optimizer_prune import PRUNE_RATIO, magnitude_prune_

ROOT = Path(__file__).resolve().parents[1]


def relora_run(**kw):
    torch.manual_seed(0)
    base = TinyNet()
    y_base = None
    cfg = (
        dict(
            method="relora",
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            switch_interval=5,
            total_steps=22,
        )
        | kw
    )
    model, ctl = srlora.wrap(base, srlora.SRLoRAConfig(**cfg))
    return model, ctl, y_base


def test_the_preset_is_its_strategies_and_refuses_what_it_overrides():
    c = srlora.SRLoRAConfig(method="relora")
    assert (c.gamma, c.insertion, c.optimizer_state, c.exhaustion) == (
        1.0,
        "lora",
        "prune",
        "extend",
    )
    assert c.r_prime == c.r and c.switches and not c.svd_init
    assert srlora.SRLoRAConfig.from_dict(c.to_dict()) == c  # the saved config reads back
    with pytest.raises(ValueError, match="SRLoRAConfig.gamma: method='relora' sets gamma=1.0"):
        srlora.SRLoRAConfig(method="relora", gamma=0.25)
    with pytest.raises(ValueError, match="optimizer_state: method='relora' sets"):
        srlora.SRLoRAConfig(method="relora", optimizer_state="keep")
    with pytest.raises(ValueError, match="insertion: 'lora' needs fusion='weight'"):
        srlora.SRLoRAConfig(method="relora", fusion="virtual")
    with pytest.raises(ValueError, match="exhaustion: 'extend' adds slots without"):
        srlora.SRLoRAConfig(exhaustion="extend")  # with the paper's insertion


def test_starts_as_lora_and_restarts_keep_the_output_and_reinit_as_lora():
    torch.manual_seed(0)
    ref = TinyNet()
    model, ctl, _ = relora_run()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # LoRA's init: B = 0, W untouched, no SVD
    for L in ctl.layers:
        assert torch.equal(L.B(), torch.zeros_like(L.B()))
        bound = 1 / math.sqrt(L.shape[1])
        assert 0.5 * bound < L.A().abs().max() <= bound  # PEFT's kaiming-uniform A
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ctl.attach(opt)
    real, seen = ctl.switch_now, []

    def checked(reason=None):
        with torch.no_grad():
            y0 = model(x)
        Ws = [L.W().clone() for L in ctl.layers]
        BAs = [(L.B().clone(), L.A().clone()) for L in ctl.layers]
        n = real(reason)
        with torch.no_grad():
            y1 = model(x)
        seen.append((rel(y0, ref(x)), rel(y1, y0)))
        for L, W, (B, A) in zip(ctl.layers, Ws, BAs):
            assert rel(L.W(), W + L.scaling * B @ A) <= 1e-6  # every pair merged
            assert torch.equal(L.B(), torch.zeros_like(L.B()))  # restarted as LoRA: B = 0
            assert not torch.equal(L.A(), A)  # ... and a new random A
            for p in (L.lora_A, L.lora_B):  # ReLoRA's magnitude pruning of the state
                for key in ("exp_avg", "exp_avg_sq"):
                    v = opt.state[p][key]
                    assert (v == 0).float().mean() >= PRUNE_RATIO - 0.02
        return n

    ctl.switch_now = checked
    g = torch.Generator().manual_seed(1)
    for _ in range(22):
        model(torch.randn(16, 32, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [e["step"] for e in ctl.history] == [5, 10, 15, 20] == ctl.switch_steps
    assert all(e["slots"] == [[0, 1, 2, 3]] * 2 for e in ctl.history)
    assert len(seen) == 4
    for changed, kept in seen:
        assert changed > 1e-3  # the adapter had changed the output
        assert kept <= 1e-5  # fp32: the restart kept it
    # restarts beyond r_target's slots: the cache was extended, the ledger holds every pair
    model2, ctl2, _ = relora_run(r_target=8, switch_interval=2, total_steps=12)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=2e-2)
    ctl2.attach(opt2)
    for _ in range(12):
        model2(torch.randn(16, 32, generator=g)).pow(2).mean().backward()
        opt2.step()
        opt2.zero_grad()
    assert ctl2.num_switches == 5 and ctl2.pointers == [4 + 5 * 4] * 2
    for i, L in enumerate(ctl2.layers):
        Bd, Ad = ctl2.delta_factors(i)
        assert (
            rel(L.scaling * Bd @ Ad, L.W() + L.scaling * L.B() @ L.A() - TinyNet_weights()[i])
            <= 1e-5
        )


def TinyNet_weights():
    torch.manual_seed(0)
    net = TinyNet()
    return [net.query.weight.detach(), net.value.weight.detach()]


def test_magnitude_pruning_keeps_the_largest_under_the_mask():
    v = torch.arange(1.0, 201.0).reshape(2, 100)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0] = True
    magnitude_prune_(v, mask, 0.99)
    assert v[0].nonzero().flatten().tolist() == [99]  # the top 1% of row 0
    assert torch.equal(v[1], torch.arange(101.0, 201.0))  # outside the mask: untouched


def test_relora_is_a_method_of_the_lab():
    from srlora_lab.experiments.methods import BASE_METHODS, parse_method

    assert "relora" in BASE_METHODS
    assert parse_method("relora") == ("relora", "relora", {})


def test_the_example_trains_with_the_jagged_cosine_restarts():
    spec = importlib.util.spec_from_file_location("relora_example", ROOT / "examples/relora.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    _, ctl, lrs, losses = ex.main(steps=40, restart_every=10)
    assert ctl.switch_steps == [10, 20, 30] == [e["step"] for e in ctl.history]
    for s in ctl.switch_steps:  # the lr restarts from zero after each restart, then warms up
        assert lrs[s] == 0.0 and 0 < lrs[s + 1] < lrs[s + 2] <= lrs[s + 3]
    assert lrs[9] > lrs[15] > lrs[39] > 0  # the cosine envelope decays
    assert losses[-1] < losses[0]
