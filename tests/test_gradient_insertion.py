"""SRLoRAConfig.insertion="gradient": the new slots take the top singular directions of the part
of the last step's weight gradient the kept slots cannot follow. Checked against references: the
probe's gradient against autograd's gradient of the base weight; the directions against an
fp64 projector-and-SVD reference; and the invariants every variant keeps (a switch preserves the
output at fp32 1e-5, the export is exact, resume is bitwise)."""

import pytest
import torch
from conftest import TinyNet, minilm_classifier, rel, train_minilm_checking_switches
from test_checkpoint import N_STEPS, assert_same_run, make_run, seed_all, train

import srlora
from srlora.insertion import gradient_directions, layer_gradient, unreachable_gradient


def projector(M):
    """fp64 orthogonal projector onto the columns of M (pseudo-inverse reference)."""
    M = M.double()
    return M @ torch.linalg.pinv(M)


@pytest.mark.parametrize("c", [0, 3])
def test_unreachable_gradient_against_projectors(c):
    g = torch.Generator().manual_seed(c)
    G, B, A = (
        torch.randn(12, 9, generator=g),
        torch.randn(12, c, generator=g),
        torch.randn(c, 9, generator=g),
    )
    out = unreachable_gradient(G, B, A).double()
    ref = (
        (torch.eye(12, dtype=torch.float64) - projector(B))
        @ G.double()
        @ (torch.eye(9, dtype=torch.float64) - projector(A.T))
    )
    assert out.abs().max() > 0.1 and rel(out, ref) <= 1e-6
    if c == 0:
        assert torch.equal(out.float(), G)
    else:  # the kept slots' gradients (s*B^T G', s*G' A^T) vanish
        assert (B.double().T @ out).abs().max() <= 1e-5 * G.abs().max()
        assert (out @ A.double().T).abs().max() <= 1e-5 * G.abs().max()


def test_gradient_directions_are_the_top_of_the_unreachable_part():
    g = torch.Generator().manual_seed(5)
    G, B, A = (
        torch.randn(16, 10, generator=g),
        torch.randn(16, 2, generator=g),
        torch.randn(2, 10, generator=g),
    )
    u, vh = gradient_directions(G, B, A, 3)
    ref = unreachable_gradient(G, B, A).double()
    U, S, Vh = torch.linalg.svd(ref)
    assert torch.allclose(u.double().T @ u.double(), torch.eye(3, dtype=torch.float64), atol=1e-6)
    # the same rank-1 pairs as the reference SVD (signs free): u_j^T G' v_j == sigma_j
    gain = torch.einsum("mk,mn,kn->k", u.double(), ref, vh.double())
    assert torch.allclose(gain.abs(), S[:3], rtol=1e-5)
    assert (B.double().T @ u.double()).abs().max() <= 1e-5
    # and they beat any other orthonormal choice, e.g. the first three coordinate pairs
    assert gain.abs().sum() >= torch.diagonal(ref[:3, :3]).abs().sum()


def test_layer_gradient_is_autograd_weight_gradient():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 4, 7, generator=g)
    y = lin(x)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    assert rel(layer_gradient(x, gy, conv=False), lin.weight.grad) <= 1e-6


def test_layer_gradient_of_a_1x1_convolution():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(2, 6, 3, 5, generator=g)
    y = conv(x)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    assert rel(layer_gradient(x, gy, conv=True), conv.weight.grad.reshape(4, 6)) <= 1e-6


def wrap_tiny(insertion="gradient", fusion="weight", interval=3, switches=3, **kw):
    torch.manual_seed(0)
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=4 + 2 * switches,
        gamma=0.5,
        target_modules=["query", "value"],
        switch_interval=interval,
        total_steps=interval * switches,
        svd_method="exact",
        insertion=insertion,
        fusion=fusion,
        **kw,
    )
    return srlora.wrap(TinyNet(), cfg)


def run_with_references(model, ctl, steps, micro=1, lr=2e-2):
    """Train on random batches (``micro`` micro-batches per step). In every step the base
    weights also require grad, so autograd computes the full weight gradient beside the probe;
    around each switch record the outputs on a fixed input, the kept slots and that gradient."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ctl.attach(opt)
    x_fixed = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    seen, real = [], ctl.switch_now
    grads = {}

    def spy(*a, **k):
        probe = {i: G.clone() for i, G in ctl._probe.sums.items()}
        before = [(L.B().clone(), L.A().clone()) for L in ctl.layers]
        with torch.no_grad():
            y0 = model(x_fixed).clone()
        n = real(*a, **k)
        with torch.no_grad():
            y1 = model(x_fixed).clone()
        seen.append(
            {
                "y0": y0,
                "y1": y1,
                "probe": probe,
                "before": before,
                "autograd": {i: G.clone() for i, G in grads.items()},
            }
        )
        return n

    ctl.switch_now = spy
    g = torch.Generator().manual_seed(1)
    for L in ctl.layers:
        L.base_weight.requires_grad_(True)
    for _ in range(steps):
        for _ in range(micro):
            model(torch.randn(8, 32, generator=g)).pow(2).mean().backward()
        grads = {i: L.base_weight.grad.clone() for i, L in enumerate(ctl.layers)}
        opt.step()  # the base weights are not in the optimizer: the switch is the only writer
        opt.zero_grad()
        for L in ctl.layers:
            L.base_weight.grad = None
    for L in ctl.layers:
        L.base_weight.requires_grad_(False)
    ctl.switch_now = real
    return seen


@pytest.mark.parametrize("fusion", ["weight", "virtual"])
@pytest.mark.parametrize("micro", [1, 2])
def test_switches_insert_the_unreachable_gradient_directions(fusion, micro):
    model, ctl = wrap_tiny(fusion=fusion)
    seen = run_with_references(model, ctl, steps=9, micro=micro)
    assert len(ctl.history) == 3 and all(all(e["gradient"]) for e in ctl.history)
    k = ctl.config.r_prime
    for entry, s in zip(ctl.history, seen):
        assert rel(s["y1"], s["y0"]) <= 1e-5  # function preserved
        for j, i in enumerate(entry["modules"]):
            # the probe summed the micro-batches' weight gradients, as autograd did
            assert rel(s["probe"][i], s["autograd"][i]) <= 1e-5
            B0, A0 = s["before"][i]
            slots = entry["slots"][j]
            keep = [c for c in range(4) if c not in slots]
            ref = (
                (torch.eye(B0.shape[0], dtype=torch.float64) - projector(B0[:, keep]))
                @ s["autograd"][i].double()
                @ (torch.eye(A0.shape[1], dtype=torch.float64) - projector(A0[keep].T))
            )
            S = torch.linalg.svdvals(ref)
            L, st = ctl.layers[i], ctl.modules[i]
            p0 = entry["directions"][j][0]
            u, vh = st.U[:, p0 : p0 + k].double(), st.Vh[p0 : p0 + k].double()  # the cache
            gain = torch.einsum("mk,mn,kn->k", u, ref, vh).abs()
            assert torch.allclose(gain, S[:k], rtol=1e-4), (gain, S[:k])
            # the slots hold those directions at the paper's scale: s*B_j A_j = S_w u v^T
            B, A = L.B().double(), L.A().double()
            if entry is ctl.history[-1]:
                for c, d in zip(sorted(slots), range(k)):
                    prod = L.scaling * B[:, c : c + 1] @ A[c : c + 1]
                    want = st.S[p0 + d].double() * u[:, d : d + 1] @ vh[d : d + 1]
                    assert rel(prod, want) <= 1e-5


@pytest.mark.parametrize("fusion", ["weight", "virtual"])
def test_export_after_gradient_switches_is_exact(tmp_path, fusion):
    from peft import PeftModel

    model, ctl = wrap_tiny(fusion=fusion)
    run_with_references(model, ctl, steps=9)
    assert len(ctl.history) == 3
    torch.manual_seed(0)
    base = TinyNet()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(model(x), base(x)) > 1e-3  # the adapter changed the output
    res = srlora.export_adapter(model, ctl, tmp_path / "ad")
    assert res.error == 0.0
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyNet(), tmp_path / "ad").eval()
    model.eval()
    with torch.no_grad():
        assert rel(loaded(x), model(x)) <= 1e-5


@pytest.mark.parametrize("stop_at", [1, 3])  # the step before the first switch; right after it
def test_resume_through_gradient_switches_is_bitwise(tmp_path, stop_at):
    kw = dict(insertion="gradient")
    seed_all(1)
    straight = make_run(**kw)
    train(*[straight[i] for i in (0, 2, 3)], N_STEPS)
    assert len(straight[1].history) == 4 and all(all(e["gradient"]) for e in straight[1].history)
    seed_all(1)
    first = make_run(**kw)
    train(*[first[i] for i in (0, 2, 3)], stop_at)
    srlora.save_checkpoint(
        tmp_path / "ck", model=first[0], controller=first[1], optimizer=first[2], scheduler=first[3]
    )
    del first
    seed_all(123)
    resumed = make_run(**kw)
    srlora.load_checkpoint(
        tmp_path / "ck",
        model=resumed[0],
        controller=resumed[1],
        optimizer=resumed[2],
        scheduler=resumed[3],
    )
    train(*[resumed[i] for i in (0, 2, 3)], N_STEPS - stop_at)
    assert_same_run(straight, resumed)
    seed_all(1)  # and the directions differ from the paper's: the option is not a no-op
    paper = make_run()
    train(*[paper[i] for i in (0, 2, 3)], N_STEPS)
    assert not torch.equal(paper[1].modules[0].U, straight[1].modules[0].U)


def test_no_gradient_outside_the_step_before_a_switch_and_manual_switches_fall_back():
    model, ctl = wrap_tiny(interval=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    for step in range(2):  # steps 1, 2: the hooks record nothing (step 3 switches)
        model(torch.randn(4, 32, generator=g)).sum().backward()
        assert ctl._probe.sums == {}
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # an evaluation forward in the armed step records nothing either
        model(torch.randn(4, 32, generator=g))
    assert ctl._probe.sums == {}
    model(torch.randn(4, 32, generator=g)).sum().backward()
    assert set(ctl._probe.sums) == {0, 1}
    opt.step()  # the scheduled switch takes the sums
    opt.zero_grad()
    assert ctl._probe.sums == {} and ctl.history[-1]["gradient"] == [True, True]
    with pytest.warns(RuntimeWarning, match="no weight gradient"):
        ctl.switch_now()  # by hand: the paper's directions
    assert ctl.history[-1]["gradient"] == [False, False]


def test_config_refusals_and_the_paper_preset():
    with pytest.raises(ValueError, match="insertion"):
        srlora.SRLoRAConfig(insertion="random")
    with pytest.raises(ValueError, match="insertion: 'gradient' needs the fixed schedule"):
        srlora.SRLoRAConfig(insertion="gradient", switch_schedule="adaptive", total_steps=100)
    assert srlora.SRLoRAConfig.paper().insertion == "svd"
    with pytest.raises(ValueError, match="fixed by the paper"):
        srlora.SRLoRAConfig.paper(insertion="gradient")


@pytest.mark.slow  # ~15 s: all-MiniLM-L6-v2 (offline), 12 steps, 3 gradient switches
def test_minilm_gradient_switches_keep_outputs_and_export_exactly(tmp_path):
    """A real pretrained model (dropout on, so the recorded forward is a training one): every
    switch uses a gradient, keeps the output, and the export reproduces the model."""
    from peft import PeftModel

    cfg = srlora.SRLoRAConfig(
        r=8,
        lora_alpha=16,
        r_target=20,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        total_steps=12,
        switch_interval=3,
        insertion="gradient",
    )
    model, ctl, x, worst = train_minilm_checking_switches(cfg)
    assert len(ctl.history) == 3 and all(all(e["gradient"]) for e in ctl.history)
    assert max(worst) <= 1e-5
    with torch.no_grad():
        y = model(input_ids=x).logits
        assert rel(y, minilm_classifier()(input_ids=x).logits) > 1e-3  # training changed it
    srlora.export_adapter(model, ctl, tmp_path / "ad")
    with torch.no_grad():
        err = rel(
            PeftModel.from_pretrained(minilm_classifier(), tmp_path / "ad")
            .eval()(input_ids=x)
            .logits,
            y,
        )
    assert err <= 1e-4


def test_convolution_layers_record_their_gradient_and_switch_exactly(tmp_path):
    """1x1 convolutions (the image tasks' LoRA targets): the probe equals autograd's weight
    gradient (reshaped out x in), the switches keep the output, the export is exact."""
    from peft import PeftModel
    from test_export import TinyConv

    torch.manual_seed(0)
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=8,
        gamma=0.5,
        target_modules=["query", "value"],
        switch_interval=2,
        total_steps=6,
        svd_method="exact",
        insertion="gradient",
    )
    model, ctl = srlora.wrap(TinyConv(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    x_fixed = torch.randn(4, 6, 3, 3, generator=g)
    worst, real = [], ctl.switch_now

    def spy(*a, **k):
        with torch.no_grad():
            y0 = model(x_fixed).clone()
            n = real(*a, **k)
            worst.append(rel(model(x_fixed), y0))
        return n

    ctl.switch_now = spy
    for L in ctl.layers:
        L.base_weight.requires_grad_(True)
    for step in range(1, 5):
        model(torch.randn(4, 6, 3, 3, generator=g)).pow(2).mean().backward()
        if step % 2 == 0:  # the step before a switch: probe == autograd
            for i, L in enumerate(ctl.layers):
                assert rel(ctl._probe.sums[i], L.base_weight.grad.reshape(L.shape)) <= 1e-5
        opt.step()
        opt.zero_grad()
        for L in ctl.layers:
            L.base_weight.grad = None
    assert len(worst) == 2 and max(worst) <= 1e-5
    assert len(ctl.history) == 2 and all(all(e["gradient"]) for e in ctl.history)
    for L in ctl.layers:
        L.base_weight.requires_grad_(False)
    srlora.export_adapter(model, ctl, tmp_path / "ad")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyConv(), tmp_path / "ad").eval()
    model.eval()
    with torch.no_grad():
        assert rel(loaded(x_fixed), model(x_fixed)) <= 1e-5
