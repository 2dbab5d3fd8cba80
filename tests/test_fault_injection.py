"""Issue 25, case 5: fault injection for the frozen weight. Non-finite losses, gradients and
factors are driven through switches under every fusion mode (the weight in fp32; virtual
fusion's side path; half-precision bases with the int8 residual, the original copy, in place)
and the frozen state must stay finite and the user be told.

At c7bf1de / 2f10a77 the NaN cases put NaN into the base weight (or the side path) at the
first switch, without a warning: every test below with a poisoned factor or importance fails
there on the "finite" assertion or on ``pytest.warns`` (checked: 35 of 43 fail on 2f10a77; the
8 that pass are the two controls).
"""

import warnings

import pytest
import torch
from conftest import TinyNet

import srlora

MODES = {  # name -> (config fields, base dtype)
    "weight-fp32": (dict(fusion="weight"), torch.float32),
    "virtual-fp32": (dict(fusion="virtual"), torch.float32),
    "virtual-bf16": (dict(fusion="virtual"), torch.bfloat16),
    "residual-bf16": (dict(half_fusion="residual"), torch.bfloat16),
    "residual-fp16": (dict(half_fusion="residual"), torch.float16),
    "original-bf16": (dict(half_fusion="original"), torch.bfloat16),
    "inplace-bf16": (dict(half_fusion="inplace"), torch.bfloat16),
    "original-fp16": (dict(half_fusion="original"), torch.float16),
    "inplace-fp16": (dict(half_fusion="inplace"), torch.float16),
    "virtual-fp16": (dict(fusion="virtual"), torch.float16),
}
FP16 = [m for m in MODES if m.endswith("fp16")]


def make(mode, **kw):
    fields, dtype = MODES[mode]
    torch.manual_seed(0)
    cfg = dict(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        target_modules=["query", "value"],
        total_steps=12,
        svd_method="exact",
        **fields,
    )
    cfg.update(kw)
    model, ctl = srlora.wrap(TinyNet(dtype=dtype), srlora.SRLoRAConfig(**cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, ctl, opt, dtype


def frozen_state(ctl):
    """Everything a switch writes that training cannot repair: per module the frozen weight,
    the side path rows in use, the residual / original copy and the ledger of fused pairs."""
    out = {}
    for st in ctl.modules:
        name = st.layer.name
        out[f"{name}.W"] = st.layer.W().detach().clone()
        if st.side is not None:
            out[f"{name}.side.Bt"] = st.side.Bt[: st.side.R].clone()
            out[f"{name}.side.At"] = st.side.At[: st.side.R].clone()
        if st.residual is not None:
            out[f"{name}.residual"] = st.residual.clone()
        if st.original is not None:
            out[f"{name}.original"] = st.original.clone()
        out[f"{name}.FB"], out[f"{name}.FA"] = st.FB.clone(), st.FA.clone()
    return out


def assert_finite(state):
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"non-finite frozen state: {bad}"


def x(i, dtype):
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(i)).to(dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_loss_while_the_optimizer_steps_never_reaches_the_frozen_weight(mode):
    """Loss x NaN for steps 1-3 with the optimizer still stepping: the factors become NaN; the
    switches at 2, 4, 6, 8 skip every module, with one warning."""
    model, ctl, opt, dtype = make(mode)
    ctl.attach(opt)
    before = frozen_state(ctl)
    with pytest.warns(RuntimeWarning, match="NaN/Inf") as rec:
        for i in range(9):
            loss = model(x(i, dtype)).float().pow(2).mean()
            if i < 3:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert sum("fusing them would put" in str(w.message) for w in rec) == 1  # once
    assert ctl.num_switches == 0 and ctl.pointers == [4, 4]  # nothing was fused
    after = frozen_state(ctl)
    assert_finite(after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched


@pytest.mark.parametrize("mode", list(MODES))
def test_non_finite_gradients_while_the_optimizer_steps(mode):
    """Inf written into every gradient after backward, the optimizer stepping on it."""
    model, ctl, opt, dtype = make(mode)
    ctl.attach(opt)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        for i in range(5):
            model(x(i, dtype)).float().pow(2).mean().backward()
            if i == 1:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("inf"))
            opt.step()
            opt.zero_grad()
    assert ctl.skipped_importance_updates >= 1
    assert_finite(frozen_state(ctl))


@pytest.mark.parametrize("mode", list(MODES))
def test_skipped_optimizer_steps_with_non_finite_gradients_still_switch_finitely(mode):
    """GradScaler's pattern: the gradients are non-finite, the optimizer skips the step, the
    controller is stepped by hand. The factors stay finite, so the switches happen (the pairs
    chosen by index, which the user is told) and the frozen state stays finite. (A control:
    this held at 2f10a77 too; the guard must not stop these switches.)"""
    model, ctl, opt, dtype = make(mode)
    with pytest.warns(RuntimeWarning, match="skipped for NaN/Inf gradients"):
        for i in range(5):
            model(x(i, dtype)).float().pow(2).mean().backward()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            ctl.step(opt)  # no opt.step(): skipped, as GradScaler skips it
            opt.zero_grad()
    assert ctl.num_switches == 2
    assert_finite(frozen_state(ctl))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("poison", ["A", "B", "importance", "uncertainty"])
def test_a_poisoned_module_is_skipped_and_the_others_switch(mode, poison):
    """One module's factor (or its importance state) holds NaN/Inf at a switch: that module is
    skipped with a warning naming it, the other module switches and keeps the output."""
    model, ctl, opt, dtype = make(mode)
    ctl.attach(opt)
    for i in range(1):
        model(x(i, dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    bad = ctl.layers[0]
    with torch.no_grad():
        if poison == "importance":  # ibar, the smoothed sensitivity
            ctl.importance.state_of(ctl.importance_name(0, "A"))[0][0, 0] = float("inf")
        elif poison == "uncertainty":  # ubar, the smoothed uncertainty
            ctl.importance.state_of(ctl.importance_name(0, "B"))[1][0, 0] = float("nan")
        else:
            getattr(bad, poison)()[0, 0] = float("nan")
    before = frozen_state(ctl)
    with pytest.warns(RuntimeWarning, match=f"NaN/Inf.*{bad.name}"):
        n = ctl.switch_now()
    assert n == 1 and ctl.history[-1]["modules"] == [1]
    assert ctl.pointers == [4, 6]
    after = frozen_state(ctl)
    assert_finite(after)
    name0 = bad.name
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(name0 + "."))


def test_finite_runs_do_not_warn_about_non_finite_values():
    for mode in MODES:
        model, ctl, opt, dtype = make(mode)
        ctl.attach(opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for i in range(9):
                model(x(i, dtype)).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        assert ctl.num_switches == 4, mode


@pytest.mark.parametrize("mode", FP16)
def test_finite_factors_whose_fusion_overflows_float16_are_skipped(mode):
    """Finite fp32 factors large enough that the fused float16 weight (or the float16 side path)
    would hold Inf: 2f10a77 wrote the Inf (no warning); now that module is skipped, with a
    warning naming the dtype, and the other module switches."""
    model, ctl, opt, dtype = make(mode)
    ctl.attach(opt)
    model(x(0, dtype)).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    c = 1e6 if mode.startswith("virtual") else 3e3
    with torch.no_grad():
        ctl.layers[0].A().mul_(c)
        ctl.layers[0].B().mul_(c)
    assert torch.isfinite(ctl.layers[0].A()).all()
    with pytest.warns(RuntimeWarning, match=r"range of torch.float16.*" + ctl.layers[0].name):
        assert ctl.switch_now() == 1
    assert ctl.history[-1]["modules"] == [1]
    assert_finite(frozen_state(ctl))


def test_peaks_flag_exactly_the_non_finite_tensors_and_take_empty_shards():
    """The guard's max |x| per tensor: non-finite exactly where a NaN or Inf is; an empty tensor
    (an FSDP2 rank may hold an empty shard of a rank-2 factor) gives 0, where the infinity norm
    itself raises; a finite float16 tensor whose 2-norm would overflow stays finite."""
    from srlora.guards import _peaks

    g = torch.Generator().manual_seed(3)
    big16 = torch.full((64,), 60000.0, dtype=torch.float16)  # 2-norm 480000: beyond float16
    parts = [torch.randn(5, 7, generator=g), torch.empty(0, 7), big16, torch.randn(3, generator=g)]
    parts[3][1] = float("nan")
    got = _peaks(parts)
    assert [bool(torch.isfinite(x)) for x in got] == [True, True, True, False]
    assert float(got[0]) == float(parts[0].abs().max()) and float(got[1]) == 0.0
    assert float(got[2]) == 60000.0
    parts[3][1] = float("-inf")
    assert not torch.isfinite(_peaks(parts)[3])
