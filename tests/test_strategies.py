"""The switch's steps as strategies: a variant is one class plus its registration, the core
(controller, switch) runs it without an edit, and every refusal comes from the declarations."""

import pytest
import torch
from conftest import TinyNet, rel

import srlora
from srlora.strategies import REGISTRY, STEP_FIELDS, chosen, fsdp2_refused, names, register
from srlora.strategies.optimizer import OptimizerPolicy
from srlora.strategies.selection import Selection


@pytest.fixture
def registered():
    """Register strategies for one test, and take them out again."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls)
        return cls

    yield add
    for cls in added:
        del REGISTRY[cls.field][cls.name]


def test_every_step_has_the_papers_choice_first_and_each_variant_in_its_own_file():
    assert [names(f)[0] for f in STEP_FIELDS] == ["importance", "svd", "fixed", "stop", "zero"]
    for by_name in REGISTRY.values():
        files = {cls.__module__ for cls in by_name.values()}
        assert len(files) == len(by_name)  # one file per variant
    assert srlora.config.choices()["selection"] == names("selection")  # one source of values


def test_a_new_selection_is_one_class_and_its_registration(registered):
    @registered
    class SmallestSelection(Selection):
        name = "smallest"
        reads_factors = True

        def keys(self, scores, B, A, young):
            return B.float().norm(dim=-2) * A.float().norm(dim=-1)

    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=8,
        target_modules=["query", "value"],
        switch_interval=3,
        selection="smallest",
        svd_method="exact",
    )
    torch.manual_seed(0)
    model, ctl = srlora.wrap(TinyNet(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    real, want = ctl.switch_now, []

    def switch(reason=None):  # the two pairs of smallest |B_j| |A_j| just before the switch
        want.extend(
            (L.B().norm(dim=0) * L.A().norm(dim=1)).argsort()[:2].sort().values.tolist()
            for L in ctl.layers
        )
        return real(reason)

    ctl.switch_now = switch
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(8, 32, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert isinstance(ctl.steps.selection, SmallestSelection)
    assert [e["step"] for e in ctl.history] == [3] and ctl.history[0]["slots"] == want
    srlora.SRLoRAConfig.from_dict(cfg.to_dict())  # a saved config with it reads back


def test_declarations_make_the_refusals(registered):
    @registered
    class AdamOnly(OptimizerPolicy):
        name = "adam-only"
        needs = frozenset({"optimizer", "adam"})
        refuses = {"importance_reset": (("slots",), "needs the whole module reset")}
        fsdp2 = False

        @staticmethod
        def check_optimizer(optimizer):
            if not isinstance(optimizer, torch.optim.Adam):
                raise ValueError("SRLoRAConfig.optimizer_state='adam-only' needs torch Adam")

    with pytest.raises(
        ValueError, match="SRLoRAConfig.optimizer_state: 'adam-only' needs the whole module reset"
    ):
        srlora.SRLoRAConfig(optimizer_state="adam-only", importance_reset="slots")
    cfg = srlora.SRLoRAConfig(
        r=4, r_target=8, target_modules=["query"], total_steps=9, optimizer_state="adam-only"
    )
    assert AdamOnly in chosen(cfg) and fsdp2_refused(cfg) == ["optimizer_state='adam-only'"]
    model, ctl = srlora.wrap(TinyNet(), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="needs torch Adam"):
        ctl.attach(torch.optim.SGD(params, lr=0.1))
    ctl.attach(torch.optim.Adam(params, lr=0.1))


def test_relora_is_made_of_registered_strategies_only():
    cfg = srlora.SRLoRAConfig(method="relora")
    got = {cls.field: cls.name for cls in chosen(cfg)}
    assert got == {
        "selection": "importance",
        "insertion": "lora",
        "switch_schedule": "fixed",
        "exhaustion": "extend",
        "optimizer_state": "prune",
    }


def test_a_switch_with_each_builtin_variant_keeps_the_output():
    """Every registered value of every step, alone over the paper's defaults (those that need
    another field get it), switches and keeps the output (fp32)."""
    extra = {
        ("insertion", "lora"): dict(exhaustion="extend"),
        ("exhaustion", "extend"): dict(insertion="lora"),
        ("switch_schedule", "adaptive"): dict(adaptive_window=1),
    }
    for field in STEP_FIELDS:
        for value in names(field):
            kw = {field: value} | extra.get((field, value), {})
            cfg = srlora.SRLoRAConfig(
                r=4,
                lora_alpha=8,
                r_target=16,
                gamma=0.5,
                target_modules=["query", "value"],
                switch_interval=2,
                total_steps=12,
                svd_method="exact",
                **kw,
            )
            torch.manual_seed(0)
            model, ctl = srlora.wrap(TinyNet(), cfg)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            ctl.attach(opt)
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                model(torch.randn(8, 32, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            x = torch.randn(8, 32, generator=g)
            with torch.no_grad():
                y0 = model(x)
            assert ctl.switch_now() == 2, (field, value)
            with torch.no_grad():
                assert rel(model(x), y0) <= 1e-5, (field, value)
