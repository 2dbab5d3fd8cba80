"""Half-precision bases: the fused state is rebuilt in fp32 from the original weight, so the
rounding error of the effective weight does not grow with the number of switches."""

import math

import pytest
import torch

from srlora_lab.precision import measure_fusion_error


@pytest.mark.parametrize("fusion", ["residual", "original"])
@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_error_does_not_grow_with_switches(dtype, ulp, fusion):
    kept = measure_fusion_error(dtype, switches=20, fusion=fusion, m=64)
    naive = measure_fusion_error(dtype, switches=20, fusion="inplace", m=64)
    # one rounding of the stored weight, whatever the number of switches
    assert max(kept["errors"]) <= 1.5 * kept["error_after_1"]
    assert kept["error_after_all"] <= 2 * ulp
    # rounding in place at every switch (fp32 arithmetic, no original kept) drifts
    assert naive["error_after_all"] > 2 * kept["error_after_all"]


def test_fp32_base_is_exact_to_fp32_rounding():
    res = measure_fusion_error(torch.float32, switches=20, m=64)
    assert res["error_after_all"] <= 1e-5


def _spacing_by_frexp(hi):
    """Slow reference: 2**(e - p) from frexp, the subnormal spacing for zeros/subnormals."""
    fi = torch.finfo(hi.dtype)
    p = 1 - round(math.log2(fi.eps))
    tiny = fi.smallest_normal * 2.0 ** -(p - 1)
    _, e = torch.frexp(hi.float())
    return torch.where(hi == 0, tiny, torch.ldexp(torch.ones(hi.shape), e - p).clamp_min(tiny))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spacing_from_exponent_bits_equals_frexp_on_every_value(dtype):
    from srlora.factors import spacing

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)]  # 65,280 (bf16) / 63,488 (fp16) finite values
    assert torch.equal(spacing(every), _spacing_by_frexp(every))


def _values_over_many_binades(g):
    W = torch.randn(300, 70, generator=g) * torch.logspace(-6, 2, 70)
    W[0, :3] = torch.tensor([0.0, 1e-30, -(2.0**-20)])  # zero and (for fp16) subnormal values
    return W


def test_fp16_residual_split_and_join_carry_8_more_bits():
    from srlora.factors import join_residual, spacing, split_residual

    dtype = torch.float16
    W = _values_over_many_binades(torch.Generator().manual_seed(torch.seed() % 2**31))
    hi, q = split_residual(W.clone(), dtype)  # split_residual overwrites its input
    assert hi.dtype == dtype and q.dtype == torch.int8
    assert torch.equal(hi, W.to(dtype))  # the weight itself is the usual rounding
    # the in-place forms compute exactly the textbook expressions
    sp = _spacing_by_frexp(hi)
    assert torch.equal(q, torch.round((W - hi.float()) / sp * 254).to(torch.int8))
    back = join_residual(hi, q)
    assert torch.equal(back, hi.float() + q.float() * (sp / 254))
    err = (back.double() - W.double()).abs()
    # q is within half a step (spacing / 508); forming ``back`` in fp32 rounds once more
    half_ulp = (torch.nextafter(back.abs(), torch.tensor(float("inf"))) - back.abs()) / 2
    assert (err <= spacing(hi).double() / 508 + half_ulp.double()).all()
    assert (err < (hi.double() - W.double()).abs() + 1e-45).float().mean() > 0.99  # closer than hi
    # spacing: the gap to the next value of the format away from zero (at a power of two the
    # gap below is half of it; round to nearest never leaves more than half the larger gap)
    h = hi[hi != 0]
    away = torch.nextafter(h, torch.where(h > 0, float("inf"), float("-inf")).to(dtype))
    assert torch.equal(spacing(h), (away.float() - h.float()).abs())


def _bf16_nearest_ties_away(W):
    """Slow reference: the bf16 neighbour of W nearer in fp64, the larger magnitude on a tie."""
    toward0 = (W.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # exact
    inf = torch.where(W > 0, float("inf"), float("-inf")).to(torch.bfloat16)
    away = torch.nextafter(toward0, inf)
    d0 = (W.double() - toward0.double()).abs()
    d1 = (W.double() - away.double()).abs()
    return torch.where(d1 <= d0, away, toward0)


@pytest.mark.parametrize("byte_views", [True, False])
def test_bf16_residual_split_and_join_carry_8_more_bits(byte_views):
    from srlora.factors import _split_bf16_, join_residual, spacing, split_residual

    W = _values_over_many_binades(torch.Generator().manual_seed(torch.seed() % 2**31))
    W.view(-1)[:64] = (
        W.view(-1)[:64].to(torch.bfloat16).float()
        + torch.where(  # exact ties
            W.view(-1)[:64] > 0, 1.0, -1.0
        )
        * spacing(W.view(-1)[:64].to(torch.bfloat16))
        / 2
    )
    W[0, :3] = torch.tensor([0.0, 1e-30, -(2.0**-20)])
    hi = torch.empty(W.shape, dtype=torch.bfloat16)
    q = torch.empty(W.shape, dtype=torch.int8)
    _split_bf16_(W.clone(), hi, q, byte_views=byte_views)  # overwrites its input
    # the weight is W rounded to nearest (ties away from zero: <= spacing / 2 either way)
    assert torch.equal(hi, _bf16_nearest_ties_away(W))
    assert (hi != W.to(torch.bfloat16)).any()  # some ties that round-half-even sends the other way
    assert ((W - hi.float()).abs() <= spacing(hi) / 2).all()
    # the residual is bits 8..15 of W; the join is W with its low 8 bits replaced by 0x80
    assert torch.equal(q, ((W.view(torch.int32) >> 8) & 255).to(torch.uint8).view(torch.int8))
    back = join_residual(hi, q)
    assert torch.equal(back.view(torch.int32), (W.view(torch.int32) & -256) | 128)
    err = (back.double() - W.double()).abs()
    assert (err <= spacing(hi).double() / 512).all()
    assert (err < (hi.double() - W.double()).abs() + 1e-45).float().mean() > 0.99
    hi2, q2 = split_residual(W.clone(), torch.bfloat16)  # the allocating form, same values
    assert torch.equal(hi2, hi) and torch.equal(q2, q)
    hi3, q3 = split_residual(back.clone(), torch.bfloat16)  # a stored value splits to itself
    assert torch.equal(hi3, hi) and torch.equal(q3, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inplace_fusion_rounds_once_per_switch(dtype):
    """half_fusion="inplace": a switch adds the fused-minus-new product to the weight and rounds
    the sum once, so the effective weight W + s*B@A moves by at most half a spacing of the new
    weight (plus fp32 rounding of the factors' products); a wrong sign or a lost term moves it by
    the size of the fused pairs."""
    import srlora
    from srlora.factors import spacing

    torch.manual_seed(torch.seed() % 2**31)
    net = torch.nn.Sequential(torch.nn.Linear(48, 40, bias=False)).to(dtype)
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        target_modules=["0"],
        total_steps=10**6,
        svd_method="exact",
        half_fusion="inplace",
    )
    model, ctl = srlora.wrap(net, cfg)
    L, s = ctl.layers[0], ctl.layers[0].scaling
    ctl.importance.updates += 1  # scores are irrelevant here
    for _ in range(3):
        with torch.no_grad():  # a "training" update: the fused pairs are not the initial ones
            L.B().add_(0.1 * torch.randn(L.B().shape) * L.B().abs().mean())
            L.A().add_(0.1 * torch.randn(L.A().shape) * L.A().abs().mean())
        before = L.W().double() + s * L.B().double() @ L.A().double()
        W_prev = L.W().clone()
        ctl.switch_now()
        assert not torch.equal(L.W(), W_prev)  # the switch did change the stored weight
        after = L.W().double() + s * L.B().double() @ L.A().double()
        bound = 0.5 * spacing(L.W()).double() + 1e-6 * before.abs().max()
        assert ((after - before).abs() <= bound).all()
