"""Method texts (srlora compare --methods, study specs): experiments/methods.py."""

import pytest

from srlora_lab.experiments import methods
from srlora_lab.experiments.methods import MethodError, parse_method


@pytest.mark.parametrize(
    "text, base, config",
    [
        ("srlora", "srlora", {}),
        ("pissa", "pissa", {}),
        ("dora", "lora", {"extra_lora_kwargs": {"use_dora": True}}),
        ("srlora:rewarm", "srlora", {"optimizer_state": "rewarm"}),
        ("srlora:protect:rewarm", "srlora", {"selection": "protect", "optimizer_state": "rewarm"}),
        ("srlora:gamma=0.25:r_target=32", "srlora", {"gamma": 0.25, "r_target": 32}),
        ("srlora:fusion=virtual", "srlora", {"fusion": "virtual"}),
        (
            "srlora:paper",
            "srlora",
            {
                "beta1": 0.85,
                "beta2": 0.85,
                "importance_reset": "module",
                "optimizer_state": "zero",
                "selection": "importance",
                "switch_schedule": "fixed",
                "exhaustion": "stop",
                "insertion": "svd",
            },
        ),
        ("srlora:gradient", "srlora", {"insertion": "gradient"}),
        (
            "srlora:adaptive:refresh",
            "srlora",
            {"switch_schedule": "adaptive", "exhaustion": "refresh"},
        ),
    ],
)
def test_parse(text, base, config):
    assert parse_method(text) == (text, base, config)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("nope", "unknown method 'nope'"),
        ("srlora:", "empty setting"),
        ("srlora:bogus", "'bogus' is not a known setting"),
        ("srlora:gamma=2", "gamma"),
        ("srlora:gamma=abc", "gamma"),
        ("srlora:method=lora", "not a setting a method can take"),
        ("srlora:protect:selection=normalized", "'selection' is set twice"),
        ("srlora:paper:keep", "'optimizer_state' is set twice"),
    ],
)
def test_refused_naming_the_part(text, msg):
    with pytest.raises(MethodError, match=msg):
        parse_method(text)


def test_a_value_of_two_fields_must_name_its_field(monkeypatch):
    monkeypatch.setattr(methods, "choice_fields", lambda: {"both": ["selection", "fusion"]})
    with pytest.raises(MethodError, match="several fields"):
        parse_method("srlora:both")


def test_every_choice_value_is_found_on_the_real_config():
    values = methods.choice_fields()
    assert values["rewarm"] == ["optimizer_state"] and values["virtual"] == ["fusion"]
    assert "srlora" not in values  # the method field is the harness's
