"""Nothing half-done (issue 12): bad input refused before the model is touched, a failing wrap or
switch leaves everything as it was, step() equals attach(), PEFT options that would break the
set-up's function-preservation are refused. Each test failed on 729d3c6."""

import copy
import warnings

import pytest
import torch
from conftest import TINY_TARGETS, fresh_tiny, tiny_cfg, rel

import srlora
from srlora import switch as switch_mod

TARGETS = TINY_TARGETS
cfg, fresh = tiny_cfg, fresh_tiny


def x_batch(seed=1):
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(seed))


def structure(model):
    """Everything wrap may change without touching a tensor: module objects and grad flags."""
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        sorted(vars(model)),
    )


def tensors(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_untouched(model, before_structure, before_tensors, x, y):
    assert structure(model) == before_structure
    now = model.state_dict()
    assert set(now) == set(before_tensors)
    assert all(torch.equal(now[k], v) for k, v in before_tensors.items())
    assert torch.equal(model(x), y)


# ---------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "field,value",
    [
        ("offload_device", "nowhere"),
        ("svd_seed", "x"),
        ("svd_oversample", float("nan")),
        ("svd_niter", "x"),
        ("gamma", True),
        ("r", True),
        ("total_steps", True),
        ("svd_oversample", 2.5),
        ("beta1", float("nan")),
        ("lora_alpha", float("inf")),
        ("target_modules", [1, 2]),
        ("extra_lora_kwargs", "use_dora"),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SRLoRAConfig.{field}"):
        cfg(**{field: value})


# ---------------------------------------------------------------------- PEFT options
@pytest.mark.parametrize("method", ["srlora", "pissa"])
@pytest.mark.parametrize(
    "extra",
    [
        {"use_dora": True},
        {"lora_bias": True},
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"},
        {"r": 1},
        {"lora_alpha": 3},
    ],
)
def test_options_that_break_the_init_are_refused_before_the_model_is_touched(method, extra):
    net, x = fresh(), x_batch()
    y, st, ts = net(x).detach(), structure(net), tensors(net)
    with pytest.raises(ValueError, match="extra_lora_kwargs"):
        srlora.wrap(net, cfg(method=method, extra_lora_kwargs=extra))
    assert_untouched(net, st, ts, x, y)


def test_per_module_ranks_are_refused_for_srlora_and_work_for_pissa():
    net, x = fresh(), x_batch()
    y, st, ts = net(x).detach(), structure(net), tensors(net)
    with pytest.raises(ValueError, match="per-module ranks"):
        srlora.wrap(net, cfg(extra_lora_kwargs={"rank_pattern": {"query": 1}}))
    assert_untouched(net, st, ts, x, y)
    model, ctl = srlora.wrap(
        net, cfg(method="pissa", extra_lora_kwargs={"rank_pattern": {"query": 2}})
    )
    assert [L.r for L in ctl.layers] == [2, 4]
    assert rel(model(x), y) <= 1e-5  # PiSSA at its own rank per module keeps the function


@pytest.mark.parametrize(
    "extra",
    [
        {"use_dora": True},
        {"init_lora_weights": "olora"},
        {"init_lora_weights": "pissa"},
        {"lora_bias": True},
    ],
)
def test_peft_options_of_the_lora_baseline_keep_the_function(extra):
    net, x = fresh(), x_batch()
    y = net(x).detach()
    model, _ = srlora.wrap(net, cfg(method="lora", extra_lora_kwargs=extra))
    assert rel(model(x), y) <= 1e-5


def test_a_random_lora_start_and_unknown_options_are_refused():
    with pytest.raises(ValueError, match="init_lora_weights=False"):
        srlora.wrap(fresh(), cfg(method="lora", extra_lora_kwargs={"init_lora_weights": False}))
    with pytest.raises(ValueError, match="peft.LoraConfig refused"):
        srlora.wrap(fresh(), cfg(method="lora", extra_lora_kwargs={"no_such_option": 1}))


# ---------------------------------------------------------------------- a second wrap
@pytest.mark.parametrize("second", ["lora", "srlora"])
def test_a_second_wrap_of_a_wrapped_base_is_refused(second):
    net, x = fresh(), x_batch()
    model, ctl = srlora.wrap(net, cfg())
    with torch.no_grad():
        ctl.layers[0].B().add_(0.3)  # a trained adapter: the first model computes something new
    y = model(x).detach()
    with pytest.raises(srlora.SRLoRAError, match="already holds PEFT adapter layers"):
        srlora.wrap(net, cfg(method=second))
    assert torch.equal(model(x), y)


# ---------------------------------------------------------------------- wrap restores on failure
def _boom(*a, **k):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["svd", "state", "injection", "importance"])
def test_wrap_restores_the_model_when_a_later_step_fails(where, monkeypatch):
    net, x = fresh(), x_batch()
    y, st, ts = net(x).detach(), structure(net), tensors(net)
    kw = {}
    if where == "svd":
        kw["svd_fn"] = _boom
    elif where == "state":
        monkeypatch.setattr("srlora.initialize.StateStack", _boom)
    elif where == "injection":  # PEFT fails on the second target, after the first was replaced
        from peft.tuners.lora import LoraModel

        real, calls = LoraModel._create_and_replace, []

        def flaky(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return real(self, *a, **k)

        monkeypatch.setattr(LoraModel, "_create_and_replace", flaky)
    else:
        monkeypatch.setattr("srlora.controller.ImportanceTracker", _boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        srlora.wrap(net, cfg(), **kw)
    assert_untouched(net, st, ts, x, y)
    monkeypatch.undo()
    model, ctl = srlora.wrap(net, cfg())  # a retry on the same model works
    assert rel(model(x), y) <= 1e-5 and ctl.pointers == [4, 4]


# ---------------------------------------------------------------------- a switch fails cleanly
def _trained(seed=0):
    model, ctl = srlora.wrap(fresh(seed), cfg(total_steps=1000))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    for i in range(3):
        model(x_batch(10 + i)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, ctl, opt


def _run_state(model, ctl, opt):
    return (
        tensors(model),
        {
            id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for p, s in opt.state.items()
        },
        {
            k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
            for k, v in ctl.state_dict().items()
            if k != "modules"
        },
        {
            n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in m.items()}
            for n, m in ctl.state_dict()["modules"].items()
        },
        ctl.num_switches,
        copy.deepcopy(ctl.history),
        list(ctl.pointers),
    )


def _same(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("where", ["directions", "factors", "reshaped"])
def test_a_failing_switch_leaves_everything_as_it_was(where, monkeypatch):
    model, ctl, opt = _trained()
    if where == "directions":  # the second group's read fails after the first group's plan
        real, calls = switch_mod.next_directions, []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return real(*a, **k)

        monkeypatch.setattr(switch_mod, "next_directions", flaky)
    elif where == "factors":
        monkeypatch.setattr(switch_mod, "switch_factors", _boom)
    else:  # the second module's factors resized after wrap (a per-module rank change)
        L = ctl.layers[1]
        with torch.no_grad():
            L.layer.lora_A["default"].weight = torch.nn.Parameter(L.lora_A[:2].clone())
            L.layer.lora_B["default"].weight = torch.nn.Parameter(L.lora_B[:, :2].clone())
    before = _run_state(model, ctl, opt)
    x = x_batch()
    y = model(x).detach()
    with pytest.raises(RuntimeError, match="injected failure|set up with"):
        ctl.switch_now()
    assert _same(_run_state(model, ctl, opt), before)
    assert torch.equal(model(x), y)


# ---------------------------------------------------------------------- step() == attach()
def _train(mode, steps=9, **kw):
    model, ctl = srlora.wrap(fresh(), cfg(total_steps=steps, **kw))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if mode == "attach":
        ctl.attach(opt)
    for i in range(steps):
        model(x_batch(20 + i)).pow(2).mean().backward()
        opt.step()
        if mode == "step":
            ctl.step(opt)
        opt.zero_grad()
    return model, ctl, opt


@pytest.mark.parametrize("policy", ["zero", "keep", "rewarm"])
def test_step_and_attach_train_bitwise_the_same(policy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # neither path warns (no false alarm)
        a = _train("attach", optimizer_state=policy)
        b = _train("step", optimizer_state=policy)
    assert a[1].num_switches == b[1].num_switches == 4
    sa, sb = _run_state(*a), _run_state(*b)
    assert _same(sa[0], sb[0]) and _same(sa[2:], sb[2:])
    opt_a = [a[2].state[p] for p in a[0].parameters() if p.requires_grad]
    opt_b = [b[2].state[p] for p in b[0].parameters() if p.requires_grad]
    assert _same(opt_a, opt_b)


def test_manual_step_zeroes_the_new_slots_moments():
    model, ctl, opt = _train("step", steps=4, switch_interval=4)  # one switch, at step 4
    assert ctl.num_switches == 1
    for i, L in enumerate(ctl.layers):
        slots = ctl.history[0]["slots"][i]
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[L.lora_A][key][slots].abs().max() == 0
            assert opt.state[L.lora_B][key][:, slots].abs().max() == 0
            other = [j for j in range(L.r) if j not in slots]
            assert opt.state[L.lora_A][key][other].abs().max() > 0


def test_manual_step_without_the_optimizer_is_refused_before_counting():
    model, ctl = srlora.wrap(fresh(), cfg())
    model(x_batch()).pow(2).mean().backward()
    with pytest.raises(ValueError, match="step\\(optimizer\\)"):
        ctl.step()
    assert ctl.global_step == 0 and ctl.importance_updates == 0
    model, ctl = srlora.wrap(fresh(), cfg(optimizer_state="keep"))  # "keep" needs no optimizer
    model(x_batch()).pow(2).mean().backward()
    ctl.step()
    assert ctl.global_step == 1 and ctl.importance_updates == 1


def test_warns_when_an_optimizer_trains_but_the_controller_never_steps():
    model, ctl = srlora.wrap(fresh(), cfg())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(RuntimeWarning, match="never stepped"):
        for i in range(2):
            model(x_batch(i)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()


def test_all_nan_updates_do_not_claim_a_missing_attach():
    model, ctl = srlora.wrap(fresh(), cfg(total_steps=2, switch_interval=2))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    ctl.attach(opt)
    with pytest.warns(RuntimeWarning) as seen:
        for _ in range(2):
            (model(x_batch()).sum() * float("nan")).backward()
            opt.step()
            opt.zero_grad()
    text = " ".join(str(w.message) for w in seen)
    assert "skipped for NaN/Inf" in text and "attached" not in text and "never stepped" not in text
