"""The in-place importance update (importance.ema_) agrees bitwise with the paper's formula
written out functionally, masked or not, and the tracker with a per-tensor reference."""

import pytest
import torch

from srlora.importance import ImportanceTracker, ema_


def ema_importance(ibar, ubar, sensitivity, beta1, beta2):
    """Paper Eqs. 3-6, functional: ibar' = b1*ibar + (1-b1)*I,
    ubar' = b2*ubar + (1-b2)|I - ibar'|."""
    ibar_new = torch.lerp(ibar, sensitivity, 1.0 - beta1)
    return ibar_new, torch.lerp(ubar, (sensitivity - ibar_new).abs(), 1.0 - beta2)


B1, B2 = 0.85, 0.7


def _state(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g) * 3)


def test_ema_inplace_equals_reference():
    ibar, ubar, sens = _state(1000, 0)
    ref_i, ref_u = ema_importance(ibar, ubar, sens, B1, B2)
    ema_(ibar, ubar, sens.clone(), B1, B2)
    assert not torch.equal(ibar, _state(1000, 0)[0])  # the update did change the state
    assert torch.equal(ibar, ref_i) and torch.equal(ubar, ref_u)


@pytest.mark.parametrize("finite", [True, False])
def test_ema_masked_applies_only_when_finite(finite):
    ibar, ubar, sens = _state(1000, 1)
    ref_i, ref_u = ema_importance(ibar, ubar, sens, B1, B2)
    old_i, old_u = ibar.clone(), ubar.clone()
    if not finite:
        sens[3] = float("nan")
    ema_(ibar, ubar, sens, B1, B2, torch.tensor(finite), torch.empty_like(ibar))
    if finite:
        assert torch.equal(ibar, ref_i) and torch.equal(ubar, ref_u)
    else:
        assert torch.equal(ibar, old_i) and torch.equal(ubar, old_u)


def _reference_run(params, grads_per_step, b1, b2):
    """Slow per-tensor reference: |w*g| in fp32, AdaLoRA's EMA, skip a step with NaN/Inf."""
    ibar = [torch.zeros(p.shape) for p in params]
    ubar = [torch.zeros(p.shape) for p in params]
    skipped = 0
    for weights, grads in grads_per_step:
        sens = [
            (w.float() * g.float()).abs() if g is not None else torch.zeros(w.shape)
            for w, g in zip(weights, grads)
        ]
        if not all(torch.isfinite(s).all() for s in sens):
            skipped += 1
            continue
        for k, s in enumerate(sens):
            ibar[k], ubar[k] = ema_importance(ibar[k], ubar[k], s, b1, b2)
    return ibar, ubar, skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tracker_matches_per_tensor_reference(dtype):
    torch.manual_seed(0)
    shapes = [(8, 32), (48, 8), (8, 17), (5, 8)]
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    names = [f"m{k}.lora_{'AB'[k % 2]}" for k in range(len(params))]
    tracker = ImportanceTracker(dict(zip(names, params)), B1, B2)
    log = []
    for step in range(9):
        grads = [torch.randn(s).to(dtype) for s in shapes]
        if step == 3:
            grads[1][0, 0] = float("nan")
        if step == 5:
            grads[2][1, 1] = float("inf")
        if step == 6:
            grads[0] = None
        with torch.no_grad():
            for p in params:
                p.mul_(1.01)  # the optimizer moves the weights between steps
        for p, g in zip(params, grads):
            p.grad = g
        log.append(([p.detach().clone() for p in params], grads))
        assert tracker.update()
    ibar, ubar, skipped = _reference_run(params, log, B1, B2)
    assert skipped == 2 and int(tracker.skipped) == 2 and int(tracker.updates) == 7
    for k, name in enumerate(names):
        vi, vu = tracker.state_of(name)
        assert vi.abs().sum() > 0
        assert torch.equal(vi, ibar[k]) and torch.equal(vu, ubar[k])
