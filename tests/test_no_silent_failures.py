"""Issue 25: nothing silent. Each test reproduces a case that did the wrong thing quietly at
c7bf1de / 2f10a77 (stated per test: what the original code did) and checks the rule: a user's
file is never overwritten unless they ask; what cannot be done correctly is refused before any
change, naming the way out; what is done differently than asked is said once, naming the field.
"""

import json
import os
import warnings

import pytest
import torch
from conftest import TINY_TARGETS, fresh_tiny, tiny_cfg

import srlora

TARGETS = TINY_TARGETS
cfg, fresh = tiny_cfg, fresh_tiny


def batch(i):
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(100 + i))


def setup(**kw):
    model, ctl = srlora.wrap(fresh(), cfg(**kw))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, ctl, opt


def loss_of(model, i):
    return model(batch(i)).pow(2).mean()


def trained(steps=4, **kw):
    model, ctl, opt = setup(**kw)
    ctl.attach(opt)
    for i in range(steps):
        loss_of(model, i).backward()
        opt.step()
        opt.zero_grad()
    return model, ctl, opt


def snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------- case 1: export files
def test_export_adapter_refuses_to_overwrite_a_users_adapter(tmp_path):
    # original: export_adapter wrote over adapter_config.json / adapter_model.safetensors
    model, ctl, _ = trained()
    d = tmp_path / "mine"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"mine": true}')
    (d / "adapter_model.safetensors").write_bytes(b"my adapter")
    before = snapshot(d)
    with pytest.raises(FileExistsError, match=r"adapter_config\.json.*overwrite=True"):
        srlora.export_adapter(model, ctl, d)
    assert snapshot(d) == before  # nothing written
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        srlora.export_adapter(model, ctl, d, overwrite="yes")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        srlora.save_merged(model, ctl, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
    res = srlora.export_adapter(model, ctl, d, overwrite=True)
    assert json.loads((d / "adapter_config.json").read_text()).get("r") == res.rank
    # a new or empty folder, or one holding other files, needs no flag
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    srlora.export_adapter(model, ctl, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"
    srlora.export_adapter(model, ctl, tmp_path / "new" / "deep")


def test_save_merged_refuses_to_overwrite_a_users_model(tmp_path):
    # original: save_merged wrote model.safetensors over the user's file
    model, ctl, _ = trained()
    d = tmp_path / "mine"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"my model")
    with pytest.raises(FileExistsError, match=r"model\.safetensors.*overwrite=True"):
        srlora.save_merged(model, ctl, d)
    assert snapshot(d) == {"model.safetensors": b"my model"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folder left
    srlora.save_merged(model, ctl, d, overwrite=True)
    assert (d / "model.safetensors").read_bytes() != b"my model"
    srlora.save_merged(model, ctl, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "model.safetensors").exists()


def test_save_merged_transformers_refuses_a_folder_with_a_config(tmp_path):
    from conftest import tiny_bert

    model, ctl = srlora.wrap(tiny_bert(), cfg(target_modules=["query", "value"]))
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"config\.json"):
        srlora.save_merged(model, ctl, d)
    assert snapshot(d) == {"config.json": b"{}"}
    srlora.save_merged(model, ctl, d, overwrite=True)
    assert "model.safetensors" in os.listdir(d)


# ---------------------------------------------------------------------- case 3: double stepping
def test_attach_plus_manual_step_is_refused_before_counting():
    # original: no error; global_step 28 after 14 optimizer steps, switches at half the steps
    model, ctl, opt = setup()
    ctl.attach(opt)
    loss_of(model, 0).backward()
    opt.step()
    assert ctl.global_step == 1
    with pytest.raises(RuntimeError, match=r"attached.*twice.*detach\(\)"):
        ctl.step(opt)
    with pytest.raises(RuntimeError, match="twice"):
        ctl.step()
    assert ctl.global_step == 1 and ctl.importance_updates == 1
    # after detach, stepping by hand is the way (and the hook no longer steps)
    with pytest.warns(RuntimeWarning, match="detach"):
        ctl.detach()
    loss_of(model, 1).backward()
    opt.step()
    ctl.step(opt)
    assert ctl.global_step == 2


# ---------------------------------------------------------------------- case 4: zeroed grads
def test_importance_from_zeroed_gradients_warns_once():
    # original: zero_grad(set_to_none=False) before ctl.step: no warning, sum |Ibar| = 0
    model, ctl, opt = setup(optimizer_state="keep")
    with pytest.warns(RuntimeWarning, match=r"zero.*set_to_none=False") as rec:
        for i in range(6):
            loss_of(model, i).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            ctl.step(opt)
    assert ctl.num_switches >= 2
    assert sum("gradient on the LoRA factors was zero" in str(w.message) for w in rec) == 1


def test_real_gradients_do_not_warn_about_zeros():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, ctl, opt = trained(steps=6)
    assert ctl.num_switches >= 2


# ---------------------------------------------------------------------- case 6: total_steps
def test_resume_with_another_total_steps_uses_the_new_one(tmp_path):
    # original: the saved total_steps won silently (switch_steps [1..6] after the load where
    # the new config's 24 steps give [3, 6, ..., 18]); docs/checkpoints.md says it may differ
    model, ctl, opt = trained(steps=5, total_steps=12, r_target=16)  # switches at 1, 2, ...
    done = list(ctl.switch_steps)
    assert done == [1, 2, 3, 4, 5, 6]
    srlora.save_checkpoint(tmp_path / "ck", model=model, controller=ctl, optimizer=opt)
    model2, ctl2, opt2 = setup(total_steps=24, r_target=16)
    assert ctl2.switch_steps == [3, 6, 9, 12, 15, 18]
    with pytest.warns(RuntimeWarning, match=r"total_steps changes from 12 to 24"):
        srlora.load_checkpoint(tmp_path / "ck", model=model2, controller=ctl2, optimizer=opt2)
    assert ctl2.total_steps == 24
    # 5 switches done (steps 1..5); the 1 left is placed by the new schedule, after step 5
    assert ctl2.switch_steps == [1, 2, 3, 4, 5, 6]
    model3, ctl3, opt3 = setup(total_steps=48, r_target=16)  # interval 6: the last at 6
    with pytest.warns(RuntimeWarning, match="total_steps"):
        srlora.load_checkpoint(tmp_path / "ck", model=model3, controller=ctl3, optimizer=opt3)
    assert ctl3.switch_steps == [1, 2, 3, 4, 5, 6]
    model4, ctl4, opt4 = setup(total_steps=96, r_target=16)  # interval 13: the last at 13
    with pytest.warns(RuntimeWarning, match="total_steps"):
        srlora.load_checkpoint(tmp_path / "ck", model=model4, controller=ctl4, optimizer=opt4)
    assert ctl4.switch_steps == [1, 2, 3, 4, 5, 13]
    ctl4.attach(opt4)
    for i in range(8):
        loss_of(model4, i).backward()
        opt4.step()
        opt4.zero_grad()
    assert ctl4.num_switches == 6 and ctl4.history[-1]["step"] == 13
    # the same total_steps: no warning, the saved schedule
    model5, ctl5, opt5 = setup(total_steps=12, r_target=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        srlora.load_checkpoint(tmp_path / "ck", model=model5, controller=ctl5, optimizer=opt5)
    assert ctl5.switch_steps == done


# ---------------------------------------------------------------------- case 8: r_target
def test_r_target_beyond_the_layers_directions_warns_at_wrap():
    # original: r_target=40 on layers of 24 directions planned 18 switches, 8 of them no-ops,
    # without a word
    with pytest.warns(
        RuntimeWarning,
        match=r"r_target=40 plans 18 switches.*at most 24.*"
        r"first 10 switch.*r_target=24",
    ):
        model, ctl = srlora.wrap(fresh(), cfg(r_target=40, total_steps=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        srlora.wrap(fresh(), cfg(r_target=24, total_steps=100))  # all reachable: no warning
        srlora.wrap(fresh(), cfg(r_target=40, total_steps=100, exhaustion="refresh"))


# ---------------------------------------------------------------------- case 15
def test_export_energy_true_is_refused_like_rank_true(tmp_path):
    # original: energy=True was taken as energy 1.0, rank=True refused
    model, ctl, _ = trained()
    msgs = []
    for kw in (dict(rank=True), dict(energy=True)):
        with pytest.raises(ValueError) as e:
            srlora.export_adapter(model, ctl, tmp_path / "a", **kw)
        msgs.append(str(e.value))
    assert "energy must be in (0, 1], got True" in msgs[1]
    assert not (tmp_path / "a").exists()


def test_attach_to_a_second_optimizer_is_refused():
    # original: the second attach silently replaced the first
    model, ctl, opt = setup()
    ctl.attach(opt)
    other = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match=r"already attached to another optimizer.*detach\(\)"):
        ctl.attach(other)
    assert ctl.optimizer is opt and ctl.attached
    ctl.attach(opt)  # the same optimizer again: fine
    ctl.detach()  # before any step: nothing to warn about
    ctl.attach(other)
    assert ctl.optimizer is other


def test_detach_mid_run_warns_that_switching_stops():
    # original: detach() stopped the switching without a word
    model, ctl, opt = trained(steps=3)  # switches at 2, 4, 6, 8
    with pytest.warns(RuntimeWarning, match=r"detach\(\) at optimizer step 3: 3 scheduled"):
        ctl.detach()
    model, ctl, opt = trained(steps=9)  # every switch done: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ctl.detach()


def test_set_total_steps_mid_run_keeps_the_switch_budget():
    # the Trainer callback's path (set_total_steps after the load, from max_steps). 2f10a77:
    # [3, 6, ..., 18] from scratch, so with exhaustion="refresh" 4 switches beyond the budget
    model, ctl, opt = trained(steps=5, total_steps=12, r_target=16, exhaustion="refresh")
    assert [e["step"] for e in ctl.history] == [1, 2, 3, 4, 5]
    with pytest.warns(RuntimeWarning, match=r"total_steps changes from 12 to 24.*\[6\]"):
        ctl.set_total_steps(24)
    assert ctl.switch_steps == [1, 2, 3, 4, 5, 6] and ctl.total_steps == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ctl.set_total_steps(24)  # the same: nothing changes, nothing said
        model, ctl, opt = setup()
        ctl.set_total_steps(30)  # before the first step: a plain setting
    assert ctl.switch_steps == [6, 12, 18, 24]
