"""The config is checked in one place, up front, and again by ``srlora.wrap`` (issue 25, cases 7,
9 and 10): a baseline told to switch warns naming the ignored fields, a field changed after
construction is refused before the model is touched, and an offload device that cannot hold the
state is refused naming the field."""

import math
import warnings

import pytest
import torch
from conftest import TinyNet

import srlora


def has_peft_layers(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.parametrize("method", ["pissa", "lora"])
def test_switching_fields_on_a_baseline_warn_once_naming_them(method):
    with pytest.warns(
        UserWarning,
        match=r"switch_interval=3, switch_span=0.5, "
        r"insertion='gradient' are ignored",
    ) as got:
        cfg = srlora.SRLoRAConfig(
            method=method,
            switch_interval=3,
            switch_span=0.5,
            insertion="gradient",
            target_modules=["query"],
        )
    assert len(got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wrap checks again, but says it once
        srlora.wrap(TinyNet(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lab's shared task settings: no warning
        srlora.SRLoRAConfig(method=method, r_target=32, gamma=0.25)


@pytest.mark.parametrize(
    "kw, field",
    [(dict(gamma=7.0), "gamma"), (dict(r_target=0), "r_target"), (dict(beta1=1.5), "beta1")],
)
def test_a_baseline_range_checks_every_field(kw, field):
    with pytest.raises(ValueError, match=f"SRLoRAConfig.{field}:"):
        srlora.SRLoRAConfig(method="pissa", **kw)


def test_a_study_spec_with_a_bad_field_on_a_baseline_is_refused():
    from srlora_lab.experiments import study_spec
    from test_study import base_spec

    spec = base_spec(methods=["lora", {"name": "p", "method": "pissa", "gamma": 7}])
    with pytest.raises(study_spec.SpecError, match="gamma"):
        study_spec.parse(spec)


@pytest.mark.parametrize(
    "field, value",
    [
        ("gamma", True),
        ("svd_seed", "x"),
        ("svd_niter", "x"),
        ("svd_oversample", math.nan),
        ("offload_device", "nowhere"),
        ("offload_device", "meta"),
        ("selection", "best"),
        ("switch_interval", 0),
    ],
)
def test_a_field_changed_after_construction_is_refused_by_wrap_before_any_change(field, value):
    cfg = srlora.SRLoRAConfig(r=4, r_target=8, target_modules=["query", "value"], total_steps=10)
    setattr(cfg, field, value)
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=f"SRLoRAConfig.{field}:"):
        srlora.wrap(net, cfg)
    assert not has_peft_layers(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_combination_made_after_construction_is_refused_by_wrap():
    cfg = srlora.SRLoRAConfig(r=4, r_target=8, target_modules=["query"], total_steps=10)
    cfg.switch_schedule = "adaptive"
    cfg.insertion = "gradient"
    with pytest.raises(ValueError, match="insertion: 'gradient' needs the fixed schedule"):
        srlora.wrap(TinyNet(), cfg)


@pytest.mark.parametrize("device", ["meta", "nowhere", "cuda:x"])
def test_an_offload_device_that_holds_no_data_is_refused_up_front(device):
    with pytest.raises(ValueError, match="SRLoRAConfig.offload_device:"):
        srlora.SRLoRAConfig(offload_device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_accelerator_is_refused_by_wrap_naming_the_field():
    cfg = srlora.SRLoRAConfig(
        r=4, r_target=8, target_modules=["query"], total_steps=10, offload_device="cuda:0"
    )
    net = TinyNet()
    with pytest.raises(ValueError, match="SRLoRAConfig.offload_device: 'cuda:0' cannot hold"):
        srlora.wrap(net, cfg)
    assert not has_peft_layers(net)


def test_a_field_only_an_unchosen_strategy_reads_warns_naming_it():
    """Strategies declare the fields only they read (``reads``): set while another strategy is
    chosen, the field is named in one warning, not silently ignored."""
    with pytest.warns(
        UserWarning,
        match=r"adaptive_window=3 is ignored \(read only by "
        r"switch_schedule='adaptive'\)",
    ):
        srlora.SRLoRAConfig(adaptive_window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        srlora.SRLoRAConfig(adaptive_window=3, switch_schedule="adaptive", total_steps=100)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="relora", svd_method="exact"), r"svd_method='exact' is ignored \(no SVD"),
        (dict(method="lora", svd_niter=2), r"svd_niter=2 is ignored \(no SVD"),
        (dict(fusion="virtual", half_fusion="original"), r"half_fusion='original' is ignored"),
    ],
)
def test_a_set_up_field_that_does_not_apply_warns_naming_it(kw, match):
    with pytest.warns(UserWarning, match=match):
        srlora.SRLoRAConfig(**kw)
