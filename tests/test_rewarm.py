"""``optimizer_state="rewarm"``: a restarted slot's Adam update is bias-corrected from its own
restart (srlora/rewarm.py), against Adam's formula written out here, against "zero" and "keep"
at step 1,000, through a checkpoint, and refused where the formula does not hold."""

import pytest
import torch

import srlora
from conftest import TinyNet, rel

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


class TinyConvNet(torch.nn.Module):
    """TinyNet with 1x1 convolutions (as EfficientNet's): PEFT's conv factors are 4-D,
    A ``r x n x 1 x 1`` and B ``m x r x 1 x 1``. Takes the same ``(batch, 32)`` inputs."""

    def __init__(self):
        super().__init__()
        self.query, self.value = torch.nn.Conv2d(32, 24, 1), torch.nn.Conv2d(24, 32, 1)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        h = self.value(torch.tanh(self.query(x[:, :, None, None])))
        return self.head(h.flatten(1))


def _wrap(policy, interval, switches=1, seed=0, net=TinyNet):
    torch.manual_seed(seed)
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=4 + 2 * switches,
        gamma=0.5,
        target_modules=["query", "value"],
        switch_interval=interval,
        total_steps=interval * (switches + 1),
        svd_method="exact",
        optimizer_state=policy,
    )
    model, ctl = srlora.wrap(net(), cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=LR,
        betas=(B1, B2),
        eps=EPS,
        weight_decay=0.0,
    )
    return model, ctl, opt


def _steps(model, ctl, opt, n, gen, manual=False):
    for _ in range(n):
        model(torch.randn(8, 32, generator=gen)).pow(2).mean().backward()
        opt.step()
        if manual:
            ctl.step(opt)
        opt.zero_grad()


def _adam_update(st, t):
    """Adam's update (without the lr) for moments ``st`` at bias-correction step ``t``."""
    c1, c2 = 1 - B1**t, 1 - B2**t
    return st["exp_avg"].double() / c1 / ((st["exp_avg_sq"].double() / c2).sqrt() + EPS)


def _runs_to_1000():
    out = {}
    for policy in ("zero", "keep", "rewarm"):
        model, ctl, opt = _wrap(policy, interval=1000)
        ctl.attach(opt)
        gen = torch.Generator().manual_seed(7)
        _steps(model, ctl, opt, 1000, gen)
        assert ctl.num_switches == 1 and ctl.history[0]["step"] == 1000
        before = [(L.A().clone(), L.B().clone()) for L in ctl.layers]
        _steps(model, ctl, opt, 1, gen)  # Adam's step 1,001: the new slots' first update
        out[policy] = (ctl, opt, before)
    return out


@pytest.fixture(scope="module")
def at_1000():  # 3 x 1,001 steps: the slow suite
    return _runs_to_1000()


@pytest.mark.slow
def test_first_update_of_a_restarted_slot_at_step_1000(at_1000):
    ratio = {}
    for policy, (ctl, opt, before) in at_1000.items():
        r, other = [], []
        for i, L in enumerate(ctl.layers):
            slots = ctl.history[0]["slots"][i]
            keep = [j for j in range(L.r) if j not in slots]
            dA = (L.A() - before[i][0]).abs() / LR
            dB = (L.B() - before[i][1]).abs() / LR
            r += [dA[slots].flatten(), dB[:, slots].flatten()]
            other += [dA[keep].flatten(), dB[:, keep].flatten()]
        ratio[policy] = torch.cat(r)
        assert torch.cat(other).max() > 0  # the old slots trained too
    # "zero": m = (1-b1) g, v = (1-b2) g^2 against the bias corrections of t = 1001:
    # (1-b1) / sqrt((1-b2) / (1-b2^1001)) = 2.515x the learning rate where |g| >> eps
    jolt = (1 - B1) / ((1 - B2) / (1 - B2**1001)) ** 0.5
    assert abs(float(ratio["zero"].median()) / jolt - 1) < 2e-3
    # "rewarm": a fresh parameter's first Adam step, lr * g / (|g| + eps): never above lr
    assert float(ratio["rewarm"].max()) <= 1 + 1e-5
    assert float(ratio["rewarm"].median()) > 0.99
    # "keep": the old moments damp it (below the jolt of "zero")
    assert float(ratio["keep"].median()) < jolt


@pytest.mark.slow
def test_rewarm_changes_nothing_else(at_1000):
    """Until the first restart "rewarm" trains bitwise as "zero"; after it, the slots that were
    not restarted get bitwise the same update (their correction is exactly zero)."""
    (cz, _, bz), (cr, _, br) = at_1000["zero"], at_1000["rewarm"]
    for i, (Lz, Lr) in enumerate(zip(cz.layers, cr.layers)):
        assert torch.equal(bz[i][0], br[i][0]) and torch.equal(bz[i][1], br[i][1])
        slots = cz.history[0]["slots"][i]
        assert slots == cr.history[0]["slots"][i]
        keep = [j for j in range(Lz.r) if j not in slots]
        assert torch.equal(Lz.A()[keep], Lr.A()[keep])
        assert torch.equal(Lz.B()[:, keep], Lr.B()[:, keep])
        assert not torch.equal(Lz.A()[slots], Lr.A()[slots])


@pytest.mark.parametrize("net", [TinyNet, TinyConvNet], ids=["linear", "conv1x1"])
def test_each_update_is_adams_formula_counted_from_the_restart(net):
    """Steps 1..6 after a restart at Adam step 20: the restarted slots moved by Adam's update
    with bias correction at tau, the others at t (the formula written out in float64); for
    linear layers and for 1x1 convolutions, whose factors are 4-D."""
    model, ctl, opt = _wrap("rewarm", interval=20, net=net)
    ctl.attach(opt)
    gen = torch.Generator().manual_seed(3)
    _steps(model, ctl, opt, 20, gen)
    assert ctl.history[0]["optimizer_step"] == 20
    for tau in range(1, 7):
        before = [
            (L.lora_A.detach().double(), L.lora_B.detach().double()) for L in ctl.layers
        ]  # as stored: 4-D for a conv
        _steps(model, ctl, opt, 1, gen)
        for i, L in enumerate(ctl.layers):
            slots = ctl.history[0]["slots"][i]
            for p, old, at in (
                (L.lora_A, before[i][0], (slots,)),
                (L.lora_B, before[i][1], (slice(None), slots)),
            ):
                st = opt.state[p]
                fresh = -LR * _adam_update(st, tau)
                full = -LR * _adam_update(st, 20 + tau)
                want = full.clone()
                want[at] = fresh[at]
                new = p.detach().double()
                got = new - old
                # fp32 parameters: the moved distance is known to a few ulps of |p|; Adam's own
                # fp32 arithmetic adds ~1e-6 relative of the update
                ulp = torch.finfo(torch.float32).eps * (old.abs() + new.abs())
                assert ((got - want).abs() <= 2 * ulp + 1e-5 * want.abs()).all(), (tau, i)
                if tau == 1:  # and it differs from the global one (1.95x at t = 21)
                    assert rel(got[at], full[at]) > 0.3


def test_resume_through_restarts_is_bitwise(tmp_path):
    gen_seed = 11

    def run(stop=None, resume_from=None):
        model, ctl, opt = _wrap("rewarm", interval=4, switches=3)
        if resume_from is not None:
            srlora.load_checkpoint(resume_from, model=model, controller=ctl, optimizer=opt)
        ctl.attach(opt)
        gen = torch.Generator().manual_seed(gen_seed)
        done = ctl.global_step
        for _ in range(done):  # the batches already seen
            torch.randn(8, 32, generator=gen)
        _steps(model, ctl, opt, (stop or 16) - done, gen)
        return model, ctl, opt

    straight = run()
    assert straight[1].num_switches == 3
    model, ctl, opt = run(stop=6)  # after the first restart, mid-interval
    srlora.save_checkpoint(tmp_path / "ck", model=model, controller=ctl, optimizer=opt, rng=False)
    resumed = run(resume_from=tmp_path / "ck")
    for (n, a), b in zip(straight[0].named_parameters(), resumed[0].parameters()):
        assert torch.equal(a, b), n
    assert straight[1].history == resumed[1].history


def test_a_switch_still_preserves_the_function():
    model, ctl, opt = _wrap("rewarm", interval=4, switches=3)
    ctl.attach(opt)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 32)
    y0 = model(x).detach()
    _steps(model, ctl, opt, 7, gen)  # one switch (step 4), then 3 corrected steps
    y = model(x).detach()
    assert rel(y, y0) > 1e-3  # the adapter changed the output
    ctl.switch_now()
    assert rel(model(x), y) <= 1e-5


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "needs torch.optim.Adam or AdamW"),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True), "amsgrad"),
    ],
)
def test_other_optimizers_are_refused_before_binding(make, why):
    model, ctl, _ = _wrap("rewarm", interval=4)
    opt = make([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=why):
        ctl.attach(opt)
    assert ctl.optimizer is None and not ctl.attached
    model(torch.randn(2, 32)).sum().backward()
    with pytest.raises(ValueError, match=why):
        ctl.step(opt)
    assert ctl.global_step == 0
    with pytest.raises(ValueError, match="step\\(optimizer\\)"):
        ctl.step()  # "rewarm" needs the optimizer, as "zero" does
