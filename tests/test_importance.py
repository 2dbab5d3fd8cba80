"""Importance tracking: the fast flat-buffer path against the fp64 loop reference."""

import warnings

import pytest
import torch
from conftest import TinyNet, rel

import srlora
from srlora_lab.reference import (
    reference_importance_step,
    reference_pair_scores,
    reference_switch,
    reference_top_svd,
)


def make(**kw):
    torch.manual_seed(0)
    base = dict(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        target_modules=["query", "value"],
        total_steps=10_000,
        svd_method="exact",
        beta1=0.85,
        beta2=0.85,
        optimizer_state="keep",
    )  # gradients set by hand: no optimizer
    base.update(kw)
    net = TinyNet(d_in=12, d_hidden=10)
    W0 = {n: getattr(net, n).weight.detach().double().clone() for n in ("query", "value")}
    model, ctl = srlora.wrap(net, srlora.SRLoRAConfig(**base))
    return model, ctl, W0


@pytest.mark.parametrize("reset", ["module", "slots"])
def test_fast_path_agrees_with_reference_over_steps_and_switches(reset):
    """Random gradients, several steps and switches: importance, chosen slots, W, B, A agree."""
    model, ctl, W0 = make(importance_reset=reset)
    g = torch.Generator().manual_seed(123)
    ref = {}
    for L in ctl.layers:
        short = L.name.split(".")[-1]
        U, S, Vh = reference_top_svd(W0[short], ctl.modules[ctl.layers.index(L)].K)
        ref[L.name] = dict(
            W=L.W().double().clone(),
            B=L.B().double().clone(),
            A=L.A().double().clone(),
            U=U,
            S=S,
            Vh=Vh,
            p=L.r,
            iA=torch.zeros(L.A().shape, dtype=torch.float64),
            uA=torch.zeros(L.A().shape, dtype=torch.float64),
            iB=torch.zeros(L.B().shape, dtype=torch.float64),
            uB=torch.zeros(L.B().shape, dtype=torch.float64),
        )
    for step in range(7):
        for L in ctl.layers:  # fresh random weights' gradients (and nudge the weights)
            for prm in (L.lora_A, L.lora_B):
                prm.grad = torch.randn(prm.shape, generator=g)
        ctl.step()
        for L in ctl.layers:
            R = ref[L.name]
            R["iA"], R["uA"] = reference_importance_step(
                R["iA"], R["uA"], L.A(), L.lora_A.grad, 0.85, 0.85
            )
            R["iB"], R["uB"] = reference_importance_step(
                R["iB"], R["uB"], L.B(), L.lora_B.grad, 0.85, 0.85
            )
        for i, L in enumerate(ctl.layers):
            R = ref[L.name]
            assert (
                rel(ctl.importance.scores(ctl.importance_name(i, "A")), R["iA"] * R["uA"]) <= 1e-5
            )
            assert (
                rel(ctl.importance.scores(ctl.importance_name(i, "B")), R["iB"] * R["uB"]) <= 1e-5
            )
        if step in (2, 5):
            expected = {}
            for i, L in enumerate(ctl.layers):
                R = ref[L.name]
                sc = reference_pair_scores(R["iB"], R["uB"], R["iA"], R["uA"])
                assert rel(ctl.pair_scores(i), sc) <= 1e-5
                W, B, A, chosen, p = reference_switch(
                    R["W"], L.B(), L.A(), sc, R["U"], R["S"], R["Vh"], R["p"], 2, L.scaling
                )
                R.update(W=W, B=B, A=A, p=p)
                expected[i] = chosen
                for key in ("iA", "uA"):
                    if reset == "module":
                        R[key].zero_()
                    else:
                        R[key][chosen] = 0
                for key in ("iB", "uB"):
                    if reset == "module":
                        R[key].zero_()
                    else:
                        R[key][:, chosen] = 0
            ctl.switch_now()
            for i, L in enumerate(ctl.layers):
                R = ref[L.name]
                assert ctl.history[-1]["slots"][i] == expected[i]
                assert rel(L.W(), R["W"]) <= 1e-5
                assert rel(L.B(), R["B"]) <= 1e-5 and rel(L.A(), R["A"]) <= 1e-5
    assert ctl.importance_updates == 7


def test_nan_gradient_is_skipped_and_counted(tiny_net):
    model, ctl = srlora.wrap(
        tiny_net,
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=12,
            target_modules=["query", "value"],
            total_steps=100,
            optimizer_state="keep",
        ),
    )
    for L in ctl.layers:
        for prm in (L.lora_A, L.lora_B):
            prm.grad = torch.randn(prm.shape)
    ctl.step()
    names = list(ctl.importance.params)
    snap = [ctl.importance.scores(n).clone() for n in names]
    ctl.layers[0].lora_A.grad[0, 0] = float("nan")
    ctl.layers[1].lora_B.grad[1, 1] = float("inf")
    ctl.step()
    assert ctl.skipped_importance_updates == 1 and ctl.importance_updates == 1
    for n, before in zip(names, snap):
        assert torch.equal(ctl.importance.scores(n), before)
        assert torch.isfinite(ctl.importance.scores(n)).all()
    assert ctl.global_step == 2  # the optimizer step itself is still counted


def test_gradient_accumulation_counts_optimizer_steps(tiny_net):
    model, ctl = srlora.wrap(
        tiny_net,
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, target_modules=["query", "value"], total_steps=100
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl.attach(opt)
    for _ in range(3):
        for _ in range(4):  # 4 micro-batches per optimizer step
            model(torch.randn(4, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert ctl.global_step == 3 and ctl.importance_updates == 3


def test_importance_sees_unscaled_gradients_under_grad_scaler(tiny_net):
    """GradScaler.step unscales before optimizer.step, so the post-hook sees true gradients."""
    model, ctl = srlora.wrap(
        tiny_net,
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=12,
            target_modules=["query", "value"],
            total_steps=100,
            beta1=0.0,
            beta2=0.0,
        ),
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    ctl.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 32)
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    scaler.update()
    L = ctl.layers[0]
    true_grad = torch.autograd.grad(model(x).sum(), L.lora_A)[0]
    # beta1 = 0: ibar = |w*g|; with lr=0 the weights are unchanged by the step
    assert (
        rel(ctl.importance.state_of(ctl.importance_name(0, "A"))[0], (L.lora_A * true_grad).abs())
        <= 1e-6
    )


def test_warns_when_never_attached(tiny_net):
    model, ctl = srlora.wrap(
        tiny_net,
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, target_modules=["query", "value"], total_steps=100
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first backward alone does not warn: step() may follow
        model(torch.randn(2, 32)).sum().backward()
        opt.step()
    with pytest.warns(RuntimeWarning, match="never stepped"):  # trained, never stepped
        model(torch.randn(2, 32)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        opt.step()
        model(torch.randn(2, 32)).sum().backward()


def test_warns_when_switching_without_importance(tiny_net):
    model, ctl = srlora.wrap(
        tiny_net,
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, target_modules=["query", "value"], total_steps=100
        ),
    )
    with pytest.warns(RuntimeWarning, match="no importance update happened yet"):
        ctl.switch_now()


def test_no_warning_in_normal_use(tiny_net):
    model, ctl = srlora.wrap(
        tiny_net,
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, target_modules=["query", "value"], total_steps=6
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(6):
            model(torch.randn(2, 32)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert ctl.num_switches == 4  # (12-4)//2 = 4 switches at steps 1,2,3,4 (6 // 5 = 1)
