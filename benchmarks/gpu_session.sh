#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/benchmarks.md's llama-1b section, in one call.
# Runs in the repository root of a machine with one CUDA GPU and no network. The wheels of the
# project's pinned peft and transformers travel in .whl/ (docs/benchmarks.md, "Changed since the
# H200 run", has the commands that fill it); results go
# to $OUT (default: ./gpu-out).
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import sys, torch, peft, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, peft.__version__, transformers.__version__, torch.cuda.get_device_name())"
  nproc; free -g | head -2
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. correctness on cuda (test_devices and test_grouped_switch on cpu and cuda; svd; precision)"
SRLORA_TEST_DEVICES=cpu,cuda timeout 60 python3 -m pytest -q -p no:cacheprovider \
  tests/test_devices.py tests/test_grouped_switch.py tests/test_svd.py tests/test_precision.py \
  2>&1 | tee "$OUT/tests.log" | tail -3

echo "== 2. where the set-up SVD spends its time (llama-1b shapes)"
timeout 45 python3 benchmarks/svd_phases.py --device cuda 2>&1 | tee "$OUT/svd_phases.md" | tail -8

echo "== 2b. one bf16 weight's residual switch (against .whl/factors_before.py when carried:"
echo "   git show 9efa649:src/srlora/factors.py > .whl/factors_before.py; no git checkout there)"
timeout 30 python3 benchmarks/residual_switch.py --device cuda --before .whl/factors_before.py \
  2>&1 | tee "$OUT/residual_switch.txt" | tail -2

echo "== 3. llama-1b, the defaults (state in host memory, half_fusion=residual)"
timeout ${BENCH_TIMEOUT:-300} python3 -m srlora bench --shape llama-1b --device cuda \
  --warmup 5 --blocks 3 --steps-per-block 20 --setup-variants \
  --json "$OUT/llama-1b.json" 2>&1 | tee "$OUT/llama-1b.md" | tail -32

echo "== 4. llama-1b, half_fusion=original (rebuild from the original copy), no memory children"
timeout ${VARIANT_TIMEOUT:-90} python3 -m srlora bench --shape llama-1b --device cuda \
  --warmup 3 --blocks 2 --steps-per-block 10 --no-memory --half-fusion original \
  --json "$OUT/llama-1b-original.json" 2>&1 | tee "$OUT/llama-1b-original.md" | tail -14

echo "== 5. llama-1b, fusion=virtual (the base weight never written; the side path in the forward)"
timeout ${VIRTUAL_TIMEOUT:-120} python3 -m srlora bench --shape llama-1b --device cuda \
  --warmup 3 --blocks 3 --steps-per-block 10 --no-memory --fusion virtual \
  --json "$OUT/llama-1b-virtual.json" 2>&1 | tee "$OUT/llama-1b-virtual.md" | tail -14
