"""``srlora bench``: what an SRLoRA step, set-up and switch cost against PEFT's LoRA and PiSSA.

Everything the benchmark reports is measured here, in one process where it is a comparison of
step times (the two models train interleaved, A B B A ..., on the same batch, from deep copies of
the same base weights), and in one child process per method where it is a peak-memory figure (so
each peak belongs to one method only). Timing uses medians over many steps, repeated in blocks.

Shapes (random init, no download): ``minilm`` (BERT, 6 layers, hidden 384; r=8 on query/value),
``many-small`` (BERT, 24 layers, hidden 128; r=8 on every linear layer: per-tensor overhead
dominates), ``llama-1b`` (Llama, hidden 2048, 16 layers, intermediate 5632, all 7 projections,
bf16, batch 8 x 512; CUDA only) and ``tiny`` (for smoke tests).

The package: ``shapes`` (what is measured: shapes, options, models, configurations, the memory
allowance), ``timing`` (interleaved steps, switches, set-up), ``accuracy`` (singular directions
against an exact SVD), ``memory`` (one child process per method; ``python -m srlora_lab.bench``
runs one), ``run`` (``run_bench``, the whole benchmark) and ``report`` (targets and the
markdown table).
"""

from .accuracy import pretrained_minilm_weights, svd_accuracy
from .memory import memory_child, memory_summary, run_memory_child
from .report import format_report, targets
from .run import machine_info, run_bench
from .shapes import (
    MEMORY_RATIO_TARGET,
    SHAPES,
    STEP_RATIO_TARGET,
    SVD_SPEEDUP_TARGET,
    BenchOptions,
    Shape,
    build_base_model,
    check_device,
    ledger_bytes,
    lora_config,
    loss_of,
    make_batch,
    resolve_shape,
    srlora_config,
    svd_cache_bytes,
)
from .timing import interleaved_times, setup_times, step_summary, switch_profile

__all__ = [
    "BenchOptions",
    "MEMORY_RATIO_TARGET",
    "SHAPES",
    "STEP_RATIO_TARGET",
    "SVD_SPEEDUP_TARGET",
    "Shape",
    "build_base_model",
    "check_device",
    "format_report",
    "interleaved_times",
    "ledger_bytes",
    "lora_config",
    "loss_of",
    "machine_info",
    "make_batch",
    "memory_child",
    "memory_summary",
    "pretrained_minilm_weights",
    "resolve_shape",
    "run_bench",
    "run_memory_child",
    "setup_times",
    "srlora_config",
    "step_summary",
    "svd_accuracy",
    "svd_cache_bytes",
    "switch_profile",
    "targets",
]
