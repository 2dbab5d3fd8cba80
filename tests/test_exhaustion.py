"""SRLoRAConfig.exhaustion: "stop" (the paper) and "refresh" (a new block of directions from the
SVD of the current frozen weight). Every refresh switch must keep the output (fp32 1e-5), the
export must stay exact and resume bitwise, in both fusion modes."""

import pytest
import torch
from conftest import TinyNet, minilm_classifier, rel, train_minilm_checking_switches
from test_checkpoint import N_STEPS, assert_same_run, make_run, seed_all, train

import srlora
from srlora.refresh import frozen_weight

# r=4, r'=2, r_target=8: one block holds 2 switches; switch_interval=2 over 12 steps: 5 switches
REFRESH = dict(r_target=8, switch_interval=2, exhaustion="refresh")


def wrap_tiny(fusion="weight", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(
        r=4,
        lora_alpha=8,
        r_target=8,
        gamma=0.5,
        target_modules=["query", "value"],
        total_steps=12,
        switch_interval=2,
        svd_method="exact",
        exhaustion="refresh",
        fusion=fusion,
    )
    cfg.update(kw)
    return srlora.wrap(TinyNet(dtype=dtype), srlora.SRLoRAConfig(**cfg))


def run_with_checks(model, ctl, steps=12, lr=2e-2, dtype=torch.float32):
    """Train on random batches; around every switch record the outputs on a fixed probe, the
    frozen weights and the directions the switch appended."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ctl.attach(opt)
    probe = torch.randn(16, 32, generator=torch.Generator().manual_seed(7), dtype=dtype)
    seen, real = [], ctl.switch_now

    def spy(*a, **k):
        with torch.no_grad():
            y0 = model(probe).clone()
            frozen = [frozen_weight(st).double() for st in ctl.modules]
            p0 = [st.p for st in ctl.modules]
            n = real(*a, **k)
            y1 = model(probe).clone()
        seen.append({"y0": y0, "y1": y1, "frozen": frozen, "p0": p0})
        return n

    ctl.switch_now = spy
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 32, generator=g, dtype=dtype)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    ctl.switch_now = real
    return seen, probe


def check_refresh_blocks(ctl, seen, rtol=1e-5):
    """Each refreshed block is the top of the exact SVD of the frozen weight just before its
    switch (signs free), and starts where the pointer was."""
    k = ctl.config.r_prime
    for entry, s in zip(ctl.history, seen):
        for i in entry["refreshed"]:
            st, p = ctl.modules[i], s["p0"][i]
            assert p in st.blocks
            end = min(st.K, st.blocks[st.blocks.index(p) + 1]) if st.blocks[-1] != p else st.K
            U, S, Vh = torch.linalg.svd(s["frozen"][i], full_matrices=False)
            b = end - p
            assert b == 4  # K0 - r directions per refresh
            assert torch.allclose(st.S[p:end].double(), S[:b], rtol=rtol, atol=1e-6)
            align = (st.U[:, p:end].double() * U[:, :b]).sum(0).abs()
            assert torch.allclose(align, torch.ones(b, dtype=torch.float64), atol=10 * rtol)
            # the switch took the first k of them
            assert entry["directions"][entry["modules"].index(i)] == list(range(p, p + k))


@pytest.mark.parametrize("fusion", ["weight", "virtual"])
def test_refresh_switches_keep_the_output_and_continue_past_r_target(fusion):
    model, ctl = wrap_tiny(fusion)
    W0 = [L.W().detach().clone() for L in ctl.layers]
    seen, _ = run_with_checks(model, ctl)
    assert [e["step"] for e in ctl.history] == [2, 4, 6, 8, 10]
    assert [e["reason"] for e in ctl.history] == ["fixed"] * 5
    # the first block (directions 4..7) serves 2 switches; then every 2nd switch refreshes
    assert [bool(e["refreshed"]) for e in ctl.history] == [False, False, True, False, True]
    assert ctl.pointers == [4 + 2 * 5] * 2 and [st.blocks for st in ctl.modules] == [[8, 12]] * 2
    for s in seen:
        assert rel(s["y1"], s["y0"]) <= 1e-5  # every switch, refresh or not, keeps the output
    check_refresh_blocks(ctl, seen)
    if fusion == "virtual":  # the base weight is never written
        assert all(torch.equal(L.W(), w) for L, w in zip(ctl.layers, W0))


def test_stop_is_the_paper_exhausted_modules_switch_no_more():
    model, ctl = wrap_tiny(exhaustion="stop")
    run_with_checks(model, ctl)
    assert ctl.switch_steps == [2, 4]  # N = (8 - 4) // 2
    assert ctl.num_switches == 2 and ctl.pointers == [8, 8]
    assert all("refreshed" not in e for e in ctl.history)
    assert all(st.blocks == [] and st.K == 8 for st in ctl.modules)


@pytest.mark.parametrize("fusion", ["weight", "virtual"])
def test_export_after_refreshes_is_exact(tmp_path, fusion):
    from peft import PeftModel

    model, ctl = wrap_tiny(fusion)
    run_with_checks(model, ctl)
    assert sum(bool(e["refreshed"]) for e in ctl.history) == 2
    model.eval()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    base = TinyNet()
    W0 = {"query": base.query.weight.detach().clone(), "value": base.value.weight.detach().clone()}
    for i, L in enumerate(ctl.layers):  # W0 + s*Bd@Ad is the effective weight
        Bd, Ad = ctl.delta_factors(i)
        W_eff = L.W().double() + L.scaling * L.B().double() @ L.A().double()
        if fusion == "virtual":
            st = ctl.modules[i]
            side = st.side
            W_eff += L.scaling * side.Bt[: side.R].double().T @ side.At[: side.R].double()
        w0 = W0[L.name.rsplit(".", 1)[-1]].double()
        assert rel(w0 + L.scaling * Bd.double() @ Ad.double(), W_eff) <= 1e-6
        # what a refresh decomposes: everything but s*B@A
        BA = L.scaling * L.B().double() @ L.A().double()
        assert rel(frozen_weight(ctl.modules[i]).double() + BA, W_eff) <= 1e-6
    res = srlora.export_adapter(model, ctl, tmp_path / "ad")
    assert res.error == 0.0 and set(res.ranks.values()) == {4 + 10 + 14}
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyNet(), tmp_path / "ad").eval()
    with torch.no_grad():
        assert rel(loaded(x), model(x)) <= 1e-5


@pytest.mark.parametrize(
    "fusion, half", [("weight", "residual"), ("weight", "original"), ("virtual", "residual")]
)
def test_bf16_refresh_keeps_the_output_to_bf16_rounding(fusion, half):
    model, ctl = wrap_tiny(fusion, dtype=torch.bfloat16, half_fusion=half)
    seen, _ = run_with_checks(model, ctl, dtype=torch.bfloat16)
    assert sum(bool(e["refreshed"]) for e in ctl.history) == 2
    check_refresh_blocks(ctl, seen, rtol=1e-2)  # the frozen weight, read back in fp32
    for s in seen:  # the new slots are rounded to bf16 (2^-9 relative), so is the output
        assert rel(s["y1"].float(), s["y0"].float()) <= 2e-2


@pytest.mark.parametrize("fusion", ["weight", "virtual"])
@pytest.mark.parametrize("stop_at", [5, 7])  # before the first refresh (at 6); after it
def test_resume_across_a_refresh_is_bitwise(tmp_path, fusion, stop_at):
    seed_all(1)
    straight = make_run(**REFRESH, fusion=fusion)
    train(*[straight[i] for i in (0, 2, 3)], N_STEPS)
    assert [bool(e["refreshed"]) for e in straight[1].history] == [False, False, True, False, True]
    seed_all(1)
    first = make_run(**REFRESH, fusion=fusion)
    train(*[first[i] for i in (0, 2, 3)], stop_at)
    srlora.save_checkpoint(
        tmp_path / "ck", model=first[0], controller=first[1], optimizer=first[2], scheduler=first[3]
    )
    del first
    seed_all(123)
    resumed = make_run(**REFRESH, fusion=fusion)
    srlora.load_checkpoint(
        tmp_path / "ck",
        model=resumed[0],
        controller=resumed[1],
        optimizer=resumed[2],
        scheduler=resumed[3],
    )
    assert [st.K for st in resumed[1].modules] == [8 if stop_at < 6 else 12] * 4
    train(*[resumed[i] for i in (0, 2, 3)], N_STEPS - stop_at)
    assert_same_run(straight, resumed)


def test_refreshed_checkpoint_is_refused_by_a_stop_controller(tmp_path):
    seed_all(1)
    run = make_run(**REFRESH)
    train(*[run[i] for i in (0, 2, 3)], 7)
    sd = run[1].state_dict()
    other = make_run(r_target=8, switch_interval=2)
    with pytest.raises(srlora.CheckpointMismatchError, match="exhaustion"):
        other[1].load_state_dict(sd)
    bad = dict(sd, modules={k: dict(v, blocks=[99]) for k, v in sd["modules"].items()})
    fresh = make_run(**REFRESH)
    with pytest.raises(srlora.CheckpointMismatchError, match="refreshed blocks"):
        fresh[1].load_state_dict(bad)
    assert all(st.K == 8 and st.p == 4 for st in fresh[1].modules)  # nothing changed


def test_refresh_with_an_interval_needs_total_steps():
    torch.manual_seed(0)
    model, ctl = srlora.wrap(
        TinyNet(),
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=8,
            target_modules=["query"],
            switch_interval=2,
            exhaustion="refresh",
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="exhaustion='refresh'.*total_steps"):
        ctl.attach(opt)
    with pytest.raises(ValueError, match="SRLoRAConfig.exhaustion"):
        srlora.SRLoRAConfig(exhaustion="cycle")


@pytest.mark.slow  # ~15 s: all-MiniLM-L6-v2 (offline), 12 steps, 2 refreshes
@pytest.mark.parametrize("fusion", ["weight", "virtual"])
def test_minilm_refresh_keeps_outputs_and_exports_exactly(tmp_path, fusion):
    """A real pretrained model: every refresh switch keeps the output, the export after two
    refreshes reproduces the model. Prints the figures quoted in docs/algorithm.md section 8."""
    from peft import PeftModel

    cfg = srlora.SRLoRAConfig(
        r=8,
        lora_alpha=16,
        r_target=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        total_steps=12,
        switch_interval=3,
        exhaustion="refresh",
        fusion=fusion,
    )
    model, ctl, x, worst = train_minilm_checking_switches(cfg)
    assert [bool(e["refreshed"]) for e in ctl.history] == [False, False, True]  # 3, 6, 9
    assert max(worst) <= 1e-5
    res = srlora.export_adapter(model, ctl, tmp_path / "ad")
    with torch.no_grad():
        y = model(input_ids=x).logits
        err = rel(
            PeftModel.from_pretrained(minilm_classifier(), tmp_path / "ad")
            .eval()(input_ids=x)
            .logits,
            y,
        )
    assert err <= 1e-4
    print(
        f"\nMiniLM-L6 q,v r=8 r_target=16 fusion={fusion}, 12 steps, switches at 3, 6, 9 "
        f"(refresh at 9): output rel. change at a switch <= {max(worst):.1e}; export rank "
        f"{res.rank}, output rel. diff {err:.1e}"
    )
