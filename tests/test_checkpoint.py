"""save_checkpoint / load_checkpoint: bitwise resume, atomic writes, refusals that change
nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel, tiny_bert

import srlora
from srlora import CheckpointMismatchError
from srlora import checkpoint as ckpt_mod

N_STEPS = 12  # r=4, r'=2, r_target=12: 4 switches, at steps 2, 4, 6, 8


def make_run(method="srlora", r_target=12, seed=0, **kw):
    """A freshly wrapped tiny BERT, AdamW, a linear schedule, controller attached."""
    base = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    cfg = dict(
        r=4,
        lora_alpha=8,
        r_target=r_target,
        gamma=0.5,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        total_steps=N_STEPS,
        svd_method="exact",
        lora_dropout=0.1,
        method=method,
    )
    if method == "relora":
        del cfg["gamma"]  # the preset's (1.0); a gamma given is refused
    cfg.update(kw)
    model, ctl = srlora.wrap(base, srlora.SRLoRAConfig(**cfg))
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (N_STEPS + 1))
    ctl.attach(opt)
    return model, ctl, opt, sched


def train(model, opt, sched, steps):
    """Batches drawn from numpy, python and torch RNGs (dropout), so all three must resume."""
    for _ in range(steps):
        ids = torch.from_numpy(np.random.randint(0, 100, size=(4, 8)))
        labels = torch.tensor([random.randint(0, 1) for _ in range(4)])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def effective(ctl):
    return [(L.W() + L.scaling * L.B() @ L.A()).detach().clone() for L in ctl.layers]


def assert_same_run(a, b):
    (ma, ca, oa, sa), (mb, cb, ob, sb) = a, b
    pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    sda, sdb = ca.state_dict(), cb.state_dict()
    assert sda["history"] == sdb["history"]
    for key in ("global_step", "num_switches", "total_steps"):
        assert sda[key] == sdb[key]
    for name, m in sda["modules"].items():
        for k, v in m.items():
            assert (
                torch.equal(v, sdb["modules"][name][k])
                if torch.is_tensor(v)
                else v == sdb["modules"][name][k]
            ), (name, k)
    if "importance" in sda:
        for k, v in sda["importance"].items():
            assert torch.equal(v, sdb["importance"][k]), k
    for s1, s2 in zip(oa.state.values(), ob.state.values()):
        for k in s1:
            assert torch.equal(s1[k], s2[k]), k
    assert sa.state_dict() == sb.state_dict()


@pytest.mark.parametrize("method", ["srlora", "pissa", "lora", "relora"])
def test_resume_is_bitwise(tmp_path, method):
    k = 5
    seed_all(1)
    straight = make_run(method)
    before = effective(straight[1])
    x = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(5))
    straight[0].eval()
    y0 = straight[0](input_ids=x).logits.detach()
    straight[0].train()
    train(*[straight[i] for i in (0, 2, 3)], N_STEPS)
    ctl = straight[1]
    if method == "srlora":
        assert ctl.switch_steps == [2, 4, 6, 8]
        assert [e["step"] for e in ctl.history] == [2, 4, 6, 8]  # switches before and after k
    if method == "relora":  # every pair merged at each restart, before and after k
        assert [e["step"] for e in ctl.history] == [4, 8] == ctl.switch_steps
    # the adapter really trained: effective weights and outputs moved
    assert min(rel(a, b) for a, b in zip(effective(ctl), before)) > 1e-2
    straight[0].eval()
    assert rel(straight[0](input_ids=x).logits, y0) > 1e-2
    straight[0].train()

    seed_all(1)
    first = make_run(method)
    train(*[first[i] for i in (0, 2, 3)], k)
    srlora.save_checkpoint(
        tmp_path / "ck", model=first[0], controller=first[1], optimizer=first[2], scheduler=first[3]
    )
    train(*[first[i] for i in (0, 2, 3)], 3)  # the interrupted process runs on, then dies
    del first
    seed_all(123)  # a new process: other RNG states, fresh objects
    resumed = make_run(method)
    manifest = srlora.load_checkpoint(
        tmp_path / "ck",
        model=resumed[0],
        controller=resumed[1],
        optimizer=resumed[2],
        scheduler=resumed[3],
    )
    assert manifest["step"] == k and resumed[1].global_step == k
    train(*[resumed[i] for i in (0, 2, 3)], N_STEPS - k)
    assert_same_run(straight, resumed)


@pytest.mark.parametrize("fusion, key", [("residual", "residual"), ("original", "original")])
def test_resume_is_bitwise_with_bf16_base_and_its_half_precision_state(tmp_path, fusion, key):
    from conftest import TinyNet

    def build():
        torch.manual_seed(0)
        model, ctl = srlora.wrap(
            TinyNet(dtype=torch.bfloat16),
            srlora.SRLoRAConfig(
                r=4,
                lora_alpha=8,
                r_target=12,
                target_modules=["query", "value"],
                total_steps=12,
                svd_method="exact",
                half_fusion=fusion,
            ),
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctl.attach(opt)
        return model, ctl, opt

    def steps(model, opt, n):
        for _ in range(n):
            x = torch.randn(8, 32).bfloat16()
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    a = build()
    assert all(getattr(st, key) is not None for st in a[1].modules)
    steps(a[0], a[2], 5)
    srlora.save_checkpoint(tmp_path / "ck", model=a[0], controller=a[1], optimizer=a[2])
    steps(a[0], a[2], 7)
    b = build()
    srlora.load_checkpoint(tmp_path / "ck", model=b[0], controller=b[1], optimizer=b[2])
    steps(b[0], b[2], 7)
    assert a[1].num_switches == 4 and [e["step"] for e in a[1].history] == [2, 4, 6, 8]
    for (n, p), q in zip(a[0].named_parameters(), b[0].parameters()):
        assert torch.equal(p, q), n
    for sa, sb in zip(a[1].modules, b[1].modules):
        assert torch.equal(getattr(sa, key), getattr(sb, key)) and sa.p == sb.p


def test_files_are_safetensors_json_and_weights_only(tmp_path):
    model, ctl, opt, sched = make_run()
    train(model, opt, sched, 3)
    srlora.save_checkpoint(
        tmp_path / "ck", model=model, controller=ctl, optimizer=opt, scheduler=sched
    )
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == [
        "controller.json",
        "controller.safetensors",
        "manifest.json",
        "model.safetensors",
        "training_state.pt",
    ]
    state = torch.load(tmp_path / "ck" / "training_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "rng"}
    man = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert man["format_version"] == 3 and man["step"] == 3
    assert man["config"]["r"] == 4 and len(man["modules"]) == 4
    assert all(v["shape"] == [32, 32] for v in man["modules"].values())
    # every adapted base weight and every trainable tensor is in the model file
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ck" / "model.safetensors")
    for L in ctl.layers:
        assert torch.equal(saved[L.name + ".base_layer.weight"], L.base_weight)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(saved[n], p), n
    assert not list(tmp_path.glob(".ck.*"))  # no temporary directory left


def test_non_plain_scheduler_state_is_refused_before_writing(tmp_path):
    model, ctl, opt, _ = make_run()

    class Odd:
        def state_dict(self):
            return {"fn": object()}

    with pytest.raises(TypeError, match="training state\\['scheduler'\\]\\['fn'\\]"):
        srlora.save_checkpoint(
            tmp_path / "ck", model=model, controller=ctl, optimizer=opt, scheduler=Odd()
        )
    assert not list(tmp_path.iterdir())


def saved_run(tmp_path, steps=3):
    run = make_run()
    train(run[0], run[2], run[3], steps)
    srlora.save_checkpoint(
        tmp_path / "ck", model=run[0], controller=run[1], optimizer=run[2], scheduler=run[3]
    )
    return run


def snapshot(run):
    model, ctl, opt, sched = run
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in _flat(ctl.state_dict()).items()},
        repr(opt.state_dict()),
        repr(sched.state_dict()),
    )


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def assert_unchanged(run, snap):
    now = snapshot(run)
    for a, b in zip(now[0].values(), snap[0].values()):
        assert torch.equal(a, b)
    for k in snap[1]:
        a, b = now[1][k], snap[1][k]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, k
    assert now[2:] == snap[2:]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(r=8, lora_alpha=16), "config differs"),
        (dict(target_modules=["query"]), "config differs"),
        (dict(r_target=16), "config differs"),
    ],
)
def test_mismatched_config_is_refused_and_nothing_changes(tmp_path, change, match):
    saved_run(tmp_path)
    other = make_run(**change)
    snap = snapshot(other)
    with pytest.raises(CheckpointMismatchError, match=match):
        srlora.load_checkpoint(
            tmp_path / "ck",
            model=other[0],
            controller=other[1],
            optimizer=other[2],
            scheduler=other[3],
        )
    assert_unchanged(other, snap)


def test_other_base_model_is_refused(tmp_path):
    saved_run(tmp_path)
    torch.manual_seed(7)
    other = make_run()
    with torch.no_grad():  # same shapes, other pretrained weights (the embeddings)
        other[0].base_model.model.bert.embeddings.word_embeddings.weight.mul_(1.01)
    snap = snapshot(other)
    with pytest.raises(CheckpointMismatchError, match="word_embeddings.weight differs"):
        srlora.load_checkpoint(
            tmp_path / "ck",
            model=other[0],
            controller=other[1],
            optimizer=other[2],
            scheduler=other[3],
        )
    assert_unchanged(other, snap)


def test_other_adapted_weights_are_refused(tmp_path):
    saved_run(tmp_path)
    base = tiny_bert()
    with torch.no_grad():
        base.bert.encoder.layer[0].attention.self.query.weight.mul_(1.5)
    cfg = srlora.SRLoRAConfig(**srlora.read_manifest(tmp_path / "ck")["config"])
    model, ctl = srlora.wrap(base, cfg)
    with pytest.raises(CheckpointMismatchError, match="singular values"):
        srlora.load_checkpoint(tmp_path / "ck", model=model, controller=ctl, restore_rng=False)


def test_other_architecture_is_refused(tmp_path):
    saved_run(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=2,
        )
    )
    cfg = srlora.SRLoRAConfig(**srlora.read_manifest(tmp_path / "ck")["config"])
    model, ctl = srlora.wrap(base, cfg)
    with pytest.raises(CheckpointMismatchError, match="adapted modules differ.*layer.2"):
        srlora.load_checkpoint(tmp_path / "ck", model=model, controller=ctl)


def test_other_optimizer_is_refused_and_nothing_changes(tmp_path):
    saved_run(tmp_path)
    model, ctl, _, sched = make_run()
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run = (model, ctl, sgd, sched)
    snap = snapshot(run)
    with pytest.raises(CheckpointMismatchError, match="optimizer differs: saved AdamW"):
        srlora.load_checkpoint(tmp_path / "ck", model=model, controller=ctl, optimizer=sgd)
    assert_unchanged(run, snap)
    # an optimizer over fewer parameters (the head left out)
    lora_only = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n])
    with pytest.raises(CheckpointMismatchError, match="group 0: 8 parameters, the checkpoint 10"):
        srlora.load_checkpoint(tmp_path / "ck", model=model, controller=ctl, optimizer=lora_only)
    assert_unchanged(run, snap)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "edit"])
def test_corrupted_checkpoint_is_refused_and_nothing_changes(tmp_path, damage):
    saved_run(tmp_path)
    d = tmp_path / "ck"
    f = d / "model.safetensors"
    if damage == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01  # one bit of one weight
        f.write_bytes(bytes(data))
    elif damage == "delete":
        (d / "controller.safetensors").unlink()
    elif damage == "manifest":
        (d / "manifest.json").write_text('{"format": "srlora-checkpoint", "format_')
    else:  # a one-character edit of valid JSON: the step 3 -> 4
        text = (d / "manifest.json").read_text()
        assert text.count('"step": 3') == 1
        (d / "manifest.json").write_text(text.replace('"step": 3', '"step": 4'))
    run = make_run()
    snap = snapshot(run)
    match = {
        "truncate": "model.safetensors has .* bytes",
        "flip": "model.safetensors is corrupted",
        "delete": "controller.safetensors is missing",
        "manifest": "not valid JSON",
        "edit": "does not match its own checksum",
    }[damage]
    with pytest.raises(CheckpointMismatchError, match=match):
        srlora.load_checkpoint(
            d, model=run[0], controller=run[1], optimizer=run[2], scheduler=run[3]
        )
    assert_unchanged(run, snap)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = saved_run(tmp_path, steps=2)  # the previous checkpoint, at step 2
    train(first[0], first[2], first[3], 2)
    real = ckpt_mod.save_file
    calls = []

    def dies_on_second_file(tensors, filename, *a, **kw):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", dies_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        srlora.save_checkpoint(
            tmp_path / "ck",
            model=first[0],
            controller=first[1],
            optimizer=first[2],
            scheduler=first[3],
        )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # temporary dir removed
    run = make_run()
    assert (
        srlora.load_checkpoint(
            tmp_path / "ck", model=run[0], controller=run[1], optimizer=run[2], scheduler=run[3]
        )["step"]
        == 2
    )
    assert run[1].global_step == 2


def test_save_killed_between_renames_loads_previous(tmp_path, monkeypatch):
    first = saved_run(tmp_path, steps=2)
    train(first[0], first[2], first[3], 2)
    real = os.rename
    calls = []

    def dies_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops after moving the old one aside
        return real(src, dst)

    monkeypatch.setattr(os, "rename", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        srlora.save_checkpoint(
            tmp_path / "ck",
            model=first[0],
            controller=first[1],
            optimizer=first[2],
            scheduler=first[3],
        )
    monkeypatch.undo()
    assert not (tmp_path / "ck").exists()
    run = make_run()
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        man = srlora.load_checkpoint(
            tmp_path / "ck", model=run[0], controller=run[1], optimizer=run[2], scheduler=run[3]
        )
    assert man["step"] == 2
    # the next save completes and cleans up
    train(run[0], run[2], run[3], 1)
    srlora.save_checkpoint(tmp_path / "ck", model=run[0], controller=run[1])
    assert srlora.read_manifest(tmp_path / "ck")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the old version is gone


KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import test_checkpoint as t
    import srlora
    from srlora import checkpoint as ck
    run = t.make_run()
    t.train(run[0], run[2], run[3], 2)
    srlora.save_checkpoint({path!r}, model=run[0], controller=run[1], optimizer=run[2],
                           scheduler=run[3])
    t.train(run[0], run[2], run[3], 2)
    real = ck.save_file
    def slow(tensors, filename, *a, **kw):
        real(tensors, filename, *a, **kw)
        open({marker!r}, "w").close()   # one file written: now kill me
        time.sleep(60)
    ck.save_file = slow
    srlora.save_checkpoint({path!r}, model=run[0], controller=run[1], optimizer=run[2],
                           scheduler=run[3])
""")


@pytest.mark.slow  # a subprocess that imports torch/transformers: ~10-25 s
def test_save_killed_by_sigkill_keeps_the_previous_checkpoint(tmp_path):
    import time

    path, marker = tmp_path / "ck", tmp_path / "marker"
    script = KILLED_SAVE.format(
        tests=str(Path(__file__).parent), path=str(path), marker=str(marker)
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the saving process ended early"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".ck.tmp-*"))  # the half-written save is left aside, unused
    run = make_run()
    assert (
        srlora.load_checkpoint(
            path, model=run[0], controller=run[1], optimizer=run[2], scheduler=run[3]
        )["step"]
        == 2
    )


def test_existing_directory_that_is_not_a_checkpoint_is_not_replaced(tmp_path):
    model, ctl, opt, sched = make_run()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an srlora checkpoint"):
        srlora.save_checkpoint(tmp_path / "mine", model=model, controller=ctl)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_model_of_another_controller_is_refused(tmp_path):
    a, b = make_run(), make_run()
    with pytest.raises(ValueError, match="not the model this controller adapts"):
        srlora.save_checkpoint(tmp_path / "ck", model=a[0], controller=b[1])


def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    """Every python block of docs/checkpoints.md, in order, in one namespace."""
    import re

    doc = (Path(__file__).parents[1] / "docs" / "checkpoints.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "docs/checkpoints.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "SRLoRA config differs" in out and "'r': (4, 8)" in out
    assert ns["result"].rank == 32 and ns["small"].rank == 8


def test_rng_restored_only_when_saved_or_asked(tmp_path):
    model, ctl, opt, sched = make_run()
    srlora.save_checkpoint(tmp_path / "no_rng", model=model, controller=ctl, rng=False)
    srlora.save_checkpoint(tmp_path / "rng", model=model, controller=ctl)
    saved = torch.get_rng_state()
    torch.manual_seed(42)
    now = torch.get_rng_state()
    fresh = make_run()
    torch.set_rng_state(now)
    srlora.load_checkpoint(tmp_path / "no_rng", model=fresh[0], controller=fresh[1])
    assert torch.equal(torch.get_rng_state(), now)  # nothing saved: left alone
    with pytest.raises(CheckpointMismatchError, match="holds no RNG state"):
        srlora.load_checkpoint(
            tmp_path / "no_rng", model=fresh[0], controller=fresh[1], restore_rng=True
        )
    srlora.load_checkpoint(tmp_path / "rng", model=fresh[0], controller=fresh[1], restore_rng=False)
    assert torch.equal(torch.get_rng_state(), now)
    srlora.load_checkpoint(tmp_path / "rng", model=fresh[0], controller=fresh[1])
    assert torch.equal(torch.get_rng_state(), saved)
