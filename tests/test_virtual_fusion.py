"""SRLoRAConfig(fusion="virtual"): the base weight stays W0 bitwise, the model computes what
fusion="weight" computes, export and resume are exact."""

import pytest
import torch
from conftest import TinyNet, rel, tiny_bert
from test_checkpoint import N_STEPS, assert_same_run, make_run, seed_all, train
from test_export import CASES, trained

import srlora


def originals(make_base):
    """The ORIGINAL base weights of a fresh base model, by parameter name."""
    return {n: p.detach().clone() for n, p in make_base().named_parameters()}


def base_unchanged(ctl, w0):
    return all(
        torch.equal(
            L.base_weight,
            w0[L.name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"],
        )
        for L in ctl.layers
    )


def run_tiny(fusion, dtype=torch.float32, check=None, **kw):
    """TinyNet trained 10 steps in train mode with lora_dropout (switches at 2, 4, 6, 8);
    ``check(model, ctl)`` runs after every step."""
    torch.manual_seed(0)
    cfg = dict(
        r=4,
        lora_alpha=8,
        r_target=12,
        target_modules=["query", "value"],
        total_steps=12,
        svd_method="exact",
        lora_dropout=0.2,
        fusion=fusion,
    )
    cfg.update(kw)
    model, ctl = srlora.wrap(TinyNet(dtype=dtype), srlora.SRLoRAConfig(**cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    model.train()
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout masks: the same draws in both modes
    for _ in range(10):
        model(torch.randn(8, 32, generator=g).to(dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if check is not None:
            check(model, ctl)
    return model, ctl


def test_virtual_is_function_equal_to_weight_fusion_through_switches_and_never_writes_w():
    torch.manual_seed(0)
    w0 = {n: p.detach().clone() for n, p in TinyNet().named_parameters()}
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))  # fresh inputs
    seen = {"weight": [], "virtual": []}

    def record(fusion):
        def check(model, ctl):
            model.eval()
            with torch.no_grad():
                seen[fusion].append(model(x).clone())
            model.train()
            if fusion == "virtual":
                assert base_unchanged(ctl, w0)  # bitwise W0 after every step and switch

        return check

    torch.manual_seed(0)
    base_y = TinyNet()(x).detach()
    mw, cw = run_tiny("weight", check=record("weight"))
    mv, cv = run_tiny("virtual", check=record("virtual"))
    assert cw.num_switches == cv.num_switches == 4 and cv.pointers == [12, 12]
    assert [e["slots"] for e in cw.history] == [e["slots"] for e in cv.history]
    assert rel(seen["virtual"][-1], base_y) > 1e-2  # the adapter really changed the output
    for yw, yv in zip(seen["weight"], seen["virtual"]):  # fp32: 1e-5 at every step
        assert rel(yv, yw) <= 1e-5
    for a, b in zip(mw.parameters(), mv.parameters()):  # trained factors agree too
        if a.requires_grad:
            assert rel(b, a) <= 1e-4
    # the side path holds rank 2p - r and is exactly the ledger's change against W0
    for i, (L, st) in enumerate(zip(cv.layers, cv.modules)):
        side = st.side
        assert side.R == 2 * st.p - L.r and side.Bt.shape[0] == 2 * st.K - L.r
        Bd, Ad = cv.delta_factors(i)
        want = Bd @ Ad - L.B() @ L.A()
        assert rel(side.Bt[: side.R].T @ side.At[: side.R], want) <= 1e-6


def test_setup_keeps_the_function_and_writes_no_weight():
    torch.manual_seed(0)
    net = TinyNet()
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(5, 32)
    y0 = net(x).detach()
    model, ctl = srlora.wrap(
        net,
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=12,
            target_modules=["query", "value"],
            total_steps=12,
            svd_method="exact",
            fusion="virtual",
        ),
    )
    assert base_unchanged(ctl, w0)
    assert all(st.residual is None and st.original is None for st in ctl.modules)
    with torch.no_grad():
        assert rel(model(x), y0) <= 1e-5
        with model.disable_adapter():  # the side path is part of the frozen base, as the
            yd = model(x)  # residual weight is with fusion="weight"
    mw, cw = srlora.wrap(
        _tiny(),
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=12,
            target_modules=["query", "value"],
            total_steps=12,
            svd_method="exact",
        ),
    )
    with torch.no_grad(), mw.disable_adapter():
        assert rel(yd, mw(x)) <= 1e-5


def _tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.mark.parametrize("case", ["bert", "gpt2", "conv"])
def test_virtual_matches_weight_fusion_and_exports_exactly(tmp_path, case):
    """Linear (BERT), Conv1D (GPT-2, fan_in_fan_out) and 1x1 Conv2d: same outputs as
    fusion="weight" after 4 switches, W bitwise W0, exact PEFT adapter and merged model."""
    from peft import PeftModel

    make_base, _, _, make_x, out = CASES[case]
    w0 = originals(make_base)
    mw, cw, _ = trained(case, fusion="weight")
    mv, cv, _ = trained(case, fusion="virtual")
    assert cv.num_switches == 4 and base_unchanged(cv, w0)
    x = make_x(torch.Generator().manual_seed(99))
    with torch.no_grad():
        yv, yw, y0 = out(mv, x), out(mw, x), out(make_base(), x)
    assert rel(yv, y0) > 1e-2 and rel(yv, yw) <= 1e-5

    srlora.export_adapter(mv, cv, tmp_path / "ad")  # unchanged code: delta vs W0 from the ledger
    loaded = PeftModel.from_pretrained(make_base(), tmp_path / "ad").eval()
    srlora.save_merged(mv, cv, tmp_path / "merged")
    assert base_unchanged(cv, w0)  # the live model is left as it was
    with torch.no_grad():
        assert rel(out(loaded, x), yv) <= 1e-5
        if case != "conv":
            merged = type(make_base()).from_pretrained(tmp_path / "merged").eval()
            assert rel(out(merged, x), yv) <= 1e-5


def test_merged_plain_module(tmp_path):
    from safetensors.torch import load_model

    model, ctl = run_tiny("virtual")
    model.eval()
    srlora.save_merged(model, ctl, tmp_path / "m")
    fresh = TinyNet()
    load_model(fresh, str(tmp_path / "m" / "model.safetensors"))
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert rel(fresh(x), model(x)) <= 1e-5 and rel(model(x), _tiny()(x)) > 1e-2


def test_bf16_base_stays_w0_and_matches_the_fp64_reference():
    """half_fusion does not apply: no residual, no rounding of W. Against an fp64 model built
    from the exact change (W0 + s*Bd@Ad), virtual's error is bf16 rounding of the activations."""
    torch.manual_seed(0)
    w0 = {n: p.detach().clone() for n, p in TinyNet(dtype=torch.bfloat16).named_parameters()}
    model, ctl = run_tiny("virtual", dtype=torch.bfloat16, check=lambda m, c: None)
    assert ctl.num_switches == 4 and base_unchanged(ctl, w0)
    assert all(st.residual is None and st.original is None for st in ctl.modules)
    assert all(st.side.Bt.dtype == torch.bfloat16 for st in ctl.modules)
    ref = _tiny().double()
    with torch.no_grad():
        for i, L in enumerate(ctl.layers):
            Bd, Ad = ctl.delta_factors(i)
            mod = getattr(ref, L.name.split(".")[-1])
            mod.weight.copy_(L.W().double() + L.scaling * Bd.double() @ Ad.double())
            mod.bias.copy_(L.layer.get_base_layer().bias.double())
        ref.head.weight.copy_(model.base_model.model.head.weight.double())
        ref.head.bias.copy_(model.base_model.model.head.bias.double())
        x = torch.randn(32, 32)
        model.eval()
        yv = model(x.bfloat16()).double()
        yr = ref(x.bfloat16().double())
    assert rel(yv, yr) <= 2e-2  # bf16 activations and factors


def test_resume_is_bitwise(tmp_path):
    """The side path is rebuilt from the saved cache, ledger and pointer, bitwise; the base
    weights are fingerprinted, not stored."""
    from safetensors.torch import load_file

    k = 5
    seed_all(1)
    straight = make_run(fusion="virtual")
    train(*[straight[i] for i in (0, 2, 3)], N_STEPS)
    assert straight[1].num_switches == 4
    seed_all(1)
    first = make_run(fusion="virtual")
    train(*[first[i] for i in (0, 2, 3)], k)
    srlora.save_checkpoint(
        tmp_path / "ck", model=first[0], controller=first[1], optimizer=first[2], scheduler=first[3]
    )
    saved = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert not any(key.endswith("base_layer.weight") for key in saved)
    del first
    seed_all(123)
    resumed = make_run(fusion="virtual")
    srlora.load_checkpoint(
        tmp_path / "ck",
        model=resumed[0],
        controller=resumed[1],
        optimizer=resumed[2],
        scheduler=resumed[3],
    )
    train(*[resumed[i] for i in (0, 2, 3)], N_STEPS - k)
    assert_same_run(straight, resumed)
    for sa, sb in zip(straight[1].modules, resumed[1].modules):
        a, b = sa.side, sb.side
        assert (
            a.R == b.R
            and torch.equal(a.Bt[: a.R], b.Bt[: b.R])
            and torch.equal(a.At[: a.R], b.At[: b.R])
        )


def test_rebuild_reproduces_the_live_side_path_bitwise():
    """After each switch, rebuilding from the state alone gives the very bits the switch wrote
    (what resume relies on)."""

    def check(model, ctl):
        for st in ctl.modules:
            Bt, At, R = st.side.Bt[: st.side.R].clone(), st.side.At[: st.side.R].clone(), st.side.R
            st.side.rebuild(st)
            assert (
                st.side.R == R
                and torch.equal(st.side.Bt[:R], Bt)
                and torch.equal(st.side.At[:R], At)
            )

    for dtype in (torch.float32, torch.bfloat16):
        _, ctl = run_tiny("virtual", dtype=dtype, check=check)
        assert ctl.num_switches == 4


def test_a_switch_writes_only_the_side_buffers_in_place():
    model, ctl = run_tiny("virtual", total_steps=None, switch_interval=10**6)
    ptrs = [
        (st.side.Bt.data_ptr(), st.side.At.data_ptr(), L.base_weight.data_ptr())
        for st, L in zip(ctl.modules, ctl.layers)
    ]
    versions = [L.base_weight._version for L in ctl.layers]
    for _ in range(4):
        ctl.switch_now()
    assert [st.p for st in ctl.modules] == [12, 12]
    assert ptrs == [
        (st.side.Bt.data_ptr(), st.side.At.data_ptr(), L.base_weight.data_ptr())
        for st, L in zip(ctl.modules, ctl.layers)
    ]
    assert versions == [L.base_weight._version for L in ctl.layers]


def test_virtual_checkpoint_does_not_load_into_weight_fusion(tmp_path):
    a = make_run(fusion="virtual")
    srlora.save_checkpoint(tmp_path / "ck", model=a[0], controller=a[1])
    b = make_run()
    with pytest.raises(srlora.CheckpointMismatchError, match="fusion"):
        srlora.load_checkpoint(tmp_path / "ck", model=b[0], controller=b[1])


def test_checkpoint_saved_before_the_field_existed_loads_as_weight_fusion(tmp_path):
    """A manifest without ``fusion`` (written before it existed) means fusion="weight"."""
    import json

    from srlora import checkpoint as ckpt_mod

    a = make_run()
    srlora.save_checkpoint(tmp_path / "ck", model=a[0], controller=a[1])
    path = tmp_path / "ck" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["fusion"]
    manifest["manifest_sha256"] = ckpt_mod.manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    b = make_run()
    srlora.load_checkpoint(tmp_path / "ck", model=b[0], controller=b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))
    sd = a[1].state_dict()
    del sd["config"]["fusion"]
    b[1].load_state_dict(sd)  # the controller's own check reads it the same way
    c = make_run(fusion="virtual")
    with pytest.raises(srlora.CheckpointMismatchError, match="'fusion': \\('weight', 'virtual'\\)"):
        srlora.load_checkpoint(tmp_path / "ck", model=c[0], controller=c[1])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(fusion="virtual", method="lora"), "fusion: 'virtual' applies to method"),
        (dict(fusion="weights"), "fusion: must be one of"),
    ],
)
def test_bad_fusion_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        srlora.SRLoRAConfig(**kw)


def test_pissa_virtual_matches_pissa_weight():
    x = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0 = tiny_bert()(input_ids=x).logits
    mw, _, _ = trained("bert", method="pissa")
    mv, cv, _ = trained("bert", method="pissa", fusion="virtual")
    assert base_unchanged(cv, originals(tiny_bert))
    with torch.no_grad():
        yv = mv(input_ids=x).logits
        assert rel(yv, y0) > 1e-2 and rel(yv, mw(input_ids=x).logits) <= 1e-5


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    """The python block of docs/algorithm.md's virtual-fusion section runs as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "algorithm.md").read_text()
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if 'fusion="virtual"' in b
    ]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "docs/algorithm.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "4 switches, pointers [12, 4], base weights unchanged: True" in out
    assert ns["result"].error == 0.0 and (tmp_path / "virtual-adapter").is_dir()


@pytest.mark.slow  # ~12 s: a subprocess building two tiny Llamas
def test_switch_time_script_compares_fusion_modes():
    """benchmarks/switch_time.py --fusion both --step-time (tiny sizes) runs and reports both."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "switch_time.py"),
            "--hidden",
            "32",
            "--layers",
            "1",
            "--intermediate",
            "64",
            "--r-target",
            "16",
            "--fusion",
            "both",
            "--step-time",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "llama: 7 modules, 2 switches, bfloat16" in out.stdout
    for what, runs in (("switch_now\\(\\)", 1), ("training step", 2)):  # steps: first, last
        got = re.findall(rf"(weight|virtual): {what} median ([0-9.]+) ms", out.stdout)
        assert [k for k, _ in got] == ["weight", "virtual"] * runs
        assert all(float(v) > 0 for _, v in got)
    assert re.search(r"virtual / weight, median of paired ratios: [0-9.]+", out.stdout)
