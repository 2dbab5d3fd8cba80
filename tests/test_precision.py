"""Half-precision bases: the fused state is rebuilt in fp32 from the original weight, so the
rounding error of the effective weight does not grow with the number of switches."""
import pytest
import torch

from srlora.precision import measure_fusion_error


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_error_does_not_grow_with_switches(dtype, ulp):
    kept = measure_fusion_error(dtype, switches=20, keep_original=True, m=64)
    naive = measure_fusion_error(dtype, switches=20, keep_original=False, m=64)
    # one rounding of the stored weight, whatever the number of switches
    assert max(kept["errors"]) <= 1.5 * kept["error_after_1"]
    assert kept["error_after_all"] <= 2 * ulp
    # rounding in place at every switch (fp32 arithmetic, no original kept) drifts
    assert naive["error_after_all"] > 2 * kept["error_after_all"]


def test_fp32_base_is_exact_to_fp32_rounding():
    res = measure_fusion_error(torch.float32, switches=20, keep_original=True, m=64)
    assert res["error_after_all"] <= 1e-5
