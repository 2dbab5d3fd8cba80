"""Every bad input raises an error naming the field, before any weight is touched."""

import copy

import pytest
import torch
from conftest import TinyNet

import srlora


def good(**kw):
    base = dict(
        r=4,
        lora_alpha=8,
        r_target=16,
        gamma=0.5,
        target_modules=["query", "value"],
        total_steps=100,
    )
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(r=0), "r"),
        (dict(r=-2), "r"),
        (dict(r=2.5), "r"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=-0.1), "gamma"),
        (dict(r=4, gamma=0.1), "gamma"),  # round(0.4) = 0 pairs per switch
        (dict(r_target=2), "r_target"),
        (dict(total_steps=0), "total_steps"),
        (dict(switch_interval=0), "switch_interval"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=-0.5), "beta2"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(method="adalora"), "method"),
        (dict(optimizer_state="drop"), "optimizer_state"),
        (dict(importance_reset="all"), "importance_reset"),
        (dict(svd_method="qr"), "svd_method"),
        (dict(target_modules=[]), "target_modules"),
    ],
)
def test_config_rejects(kw, field):
    with pytest.raises(ValueError, match=rf"SRLoRAConfig\.{field}\b"):
        srlora.SRLoRAConfig(**good(**kw))


def untouched(model, fn):
    """Run fn(model), expect an SRLoRAError, and check the model is exactly as it was."""
    snap = copy.deepcopy(model.state_dict())
    mods = [type(m) for m in model.modules()]
    with pytest.raises(srlora.SRLoRAError) as info:
        fn(model)
    assert [type(m) for m in model.modules()] == mods
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0, equal_nan=True, msg=k)
    return str(info.value)


def test_target_modules_matching_nothing(tiny_net):
    msg = untouched(
        tiny_net, lambda m: srlora.wrap(m, srlora.SRLoRAConfig(**good(target_modules=["nope"])))
    )
    assert "target_modules" in msg and "nope" in msg


def test_unsupported_layer_type():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv1d(8, 8, 3))
    msg = untouched(
        net, lambda m: srlora.wrap(m, srlora.SRLoRAConfig(**good(target_modules=["0", "1"])))
    )
    assert "'1'" in msg and "Conv1d" in msg


def test_conv2d_with_a_kernel_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    msg = untouched(
        net, lambda m: srlora.wrap(m, srlora.SRLoRAConfig(**good(target_modules=["0"])))
    )
    assert "1x1" in msg


def test_non_float_weight_says_what_to_do(tiny_net):
    tiny_net.query.weight = torch.nn.Parameter(
        tiny_net.query.weight.data.to(torch.int8), requires_grad=False
    )
    msg = untouched(tiny_net, lambda m: srlora.wrap(m, srlora.SRLoRAConfig(**good())))
    assert "query" in msg and "int8" in msg and "Load the model unquantized" in msg


def test_quantized_weight_class_is_refused(tiny_net):
    class Params4bit(torch.nn.Parameter):  # stands in for bitsandbytes' class (not installed)
        pass

    tiny_net.value.weight = Params4bit(tiny_net.value.weight.data, requires_grad=False)
    msg = untouched(tiny_net, lambda m: srlora.wrap(m, srlora.SRLoRAConfig(**good())))
    assert "value" in msg and "Params4bit" in msg and "method='lora'" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_at_svd_time(tiny_net, bad):
    tiny_net.value.weight.data[2, 3] = bad
    msg = untouched(tiny_net, lambda m: srlora.wrap(m, srlora.SRLoRAConfig(**good())))
    assert "value" in msg and "NaN/Inf" in msg


def test_baseline_lora_accepts_what_srlora_refuses():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    model, ctl = srlora.wrap(net, srlora.SRLoRAConfig(**good(target_modules=["0"], method="lora")))
    assert ctl.switch_steps == [] and ctl.modules == []


def test_already_wrapped_model_is_refused(tiny_net):
    model, _ = srlora.wrap(tiny_net, srlora.SRLoRAConfig(**good()))
    with pytest.raises(srlora.SRLoRAError, match="already a PeftModel"):
        srlora.wrap(model, srlora.SRLoRAConfig(**good()))


def test_attach_needs_a_schedule_and_the_adapter_params(tiny_net):
    model, ctl = srlora.wrap(tiny_net, srlora.SRLoRAConfig(**good(total_steps=None)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        ctl.attach(opt)
    ctl.set_total_steps(50)
    with pytest.raises(ValueError, match="does not train the LoRA factors"):
        ctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    ctl.attach(opt)
    assert ctl.attached
    with pytest.raises(ValueError, match="too few"):
        ctl.set_total_steps(3)
        ctl.switch_steps


def test_model_without_defaults_needs_target_modules():
    with pytest.raises(srlora.SRLoRAError, match="target_modules"):
        srlora.wrap(TinyNet(), srlora.SRLoRAConfig(**good(target_modules=None)))
