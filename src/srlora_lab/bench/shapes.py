"""What the benchmark measures: the shapes, the options, the models and configurations built
from them, and the sizes the memory target allows."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional

import torch

from srlora.config import SRLoRAConfig

STEP_RATIO_TARGET = 1.03
MEMORY_RATIO_TARGET = 1.03
SVD_SPEEDUP_TARGET = 10.0
MALLOC_MMAP_THRESHOLD = 65536  # bytes; set in the memory children


@dataclass(frozen=True)
class Shape:
    """A benchmark model: architecture, adapted modules, rank, batch."""

    name: str
    arch: str  # "bert" or "llama"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    targets: tuple[str, ...]
    r: int = 8
    r_target: int = 64
    batch: int = 8
    seq: int = 64
    dtype: str = "float32"
    gpu_only: bool = False


SHAPES = {
    "tiny": Shape(
        "tiny", "bert", 32, 2, 2, 64, 100, ("query", "value"), r=4, r_target=16, batch=2, seq=8
    ),
    "minilm": Shape("minilm", "bert", 384, 6, 12, 1536, 30522, ("query", "value"), batch=8, seq=64),
    "many-small": Shape(
        "many-small",
        "bert",
        128,
        24,
        4,
        512,
        1000,
        ("query", "key", "value", "dense"),
        batch=4,
        seq=32,
    ),
    "llama-1b": Shape(
        "llama-1b",
        "llama",
        2048,
        16,
        32,
        5632,
        32000,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        r=8,
        r_target=512,
        batch=8,
        seq=512,
        dtype="bfloat16",
        gpu_only=True,
    ),
}


@dataclass
class BenchOptions:
    """How long and where to measure. ``None`` fields take the shape's value."""

    shape: str = "minilm"
    device: str = "cpu"
    warmup: int = 10
    blocks: int = 4
    steps_per_block: int = 30
    r_target: Optional[int] = None
    batch: Optional[int] = None
    seq: Optional[int] = None
    threads: Optional[int] = None
    memory: bool = True
    memory_steps: int = 5
    seed: int = 0
    lr: float = 1e-4
    offload: str = "cpu"  # where SRLoRA keeps cache, ledger, originals: "cpu" or "device"
    half_fusion: str = "residual"
    fusion: str = "weight"  # SRLoRAConfig.fusion of the SRLoRA and PiSSA models
    setup_variants: bool = False  # also time srlora.wrap unbatched and with the eigh solver


# ---------------------------------------------------------------------------------- validation
def check_device(device: str) -> torch.device:
    """The torch device for ``device`` ("cpu" or "cuda"); raises ValueError if it cannot run."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device 'cuda' requested but CUDA is not available (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} GPU(s) visible); run on a machine with "
            "a GPU or use --device cpu"
        )
    return torch.device(device)


def resolve_shape(opts: BenchOptions) -> Shape:
    """The shape named in ``opts`` with its overrides applied; raises ValueError on bad input."""
    if opts.shape not in SHAPES:
        raise ValueError(f"unknown shape {opts.shape!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[opts.shape]
    if shape.gpu_only and opts.device != "cuda":
        raise ValueError(f"shape {shape.name!r} is a GPU shape: pass --device cuda")
    for name in ("warmup", "blocks", "steps_per_block", "memory_steps"):
        v = getattr(opts, name)
        if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
            raise ValueError(
                f"{name} must be an integer >= {0 if name == 'warmup' else 1}, got {v!r}"
            )
    over = {k: getattr(opts, k) for k in ("r_target", "batch", "seq") if getattr(opts, k)}
    for k, v in over.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    shape = replace(shape, **over)
    if shape.r_target < shape.r:
        raise ValueError(f"r_target = {shape.r_target} must be >= r = {shape.r}")
    return shape


# ---------------------------------------------------------------------------------- models
def build_base_model(shape: Shape, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialized model of ``shape`` on ``device`` (seeded: same weights each call)."""
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    if shape.arch == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=max(512, shape.seq),
        )
        model = BertModel(cfg, add_pooling_layer=False)
    elif shape.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=max(2048, shape.seq),
            tie_word_embeddings=False,
        )
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    else:  # pragma: no cover - SHAPES holds only the two
        raise ValueError(f"unknown architecture {shape.arch!r}")
    return model.to(device=device, dtype=dtype).train()


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)


def loss_of(shape: Shape, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every adapted layer: LM loss (llama), mean square of states (bert)."""
    if shape.arch == "llama":
        return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids).last_hidden_state.float().pow(2).mean()


def lora_config(shape: Shape, **kw):
    from peft import LoraConfig

    return LoraConfig(
        r=shape.r,
        lora_alpha=2 * shape.r,
        target_modules=list(shape.targets),
        lora_dropout=0.0,
        **kw,
    )


def srlora_config(
    shape: Shape, total_steps: int, switch_interval: Optional[int] = None, **extra
) -> SRLoRAConfig:
    return SRLoRAConfig(
        r=shape.r,
        lora_alpha=2 * shape.r,
        r_target=shape.r_target,
        target_modules=list(shape.targets),
        total_steps=total_steps,
        switch_interval=switch_interval,
        **extra,
    )


def state_options(opts: BenchOptions) -> dict:
    """The SRLoRAConfig fields that ``--offload``, ``--half-fusion`` and ``--fusion`` set."""
    return {
        "offload_device": "cpu" if opts.offload == "cpu" else None,
        "half_fusion": opts.half_fusion,
        "fusion": opts.fusion,
    }


@contextmanager
def svd_settings(device_type: str, batch_bytes: Optional[int] = None, small: Optional[str] = None):
    """Temporarily set srlora.svd's batch size / small solver for ``device_type`` (timing)."""
    from srlora import svd as svd_mod

    old = (svd_mod.BATCH_BYTES.get(device_type), svd_mod.SMALL_SOLVER.get(device_type))
    if batch_bytes is not None:
        svd_mod.BATCH_BYTES[device_type] = batch_bytes
    if small is not None:
        svd_mod.SMALL_SOLVER[device_type] = small
    try:
        yield
    finally:
        svd_mod.BATCH_BYTES[device_type], svd_mod.SMALL_SOLVER[device_type] = old


MIN_SWITCH_INTERVAL = 5


def schedule_for(shape: Shape, total_steps: int) -> Optional[int]:
    """None (the real schedule over ``total_steps``) if it fits, else an explicit interval.

    The real schedule switches every ``total_steps // (N_switch + 1)`` steps. A short benchmark
    of a large ``r_target`` (llama-1b: N_switch = 126) would switch at nearly every step, which
    no real run does; below ``MIN_SWITCH_INTERVAL`` steps the benchmark switches every
    ``max(MIN_SWITCH_INTERVAL, total_steps // 8)`` steps instead (still far denser than a real
    run, so the amortized figure overstates the switch cost).
    """
    n = srlora_config(shape, total_steps).num_switches
    if total_steps // (n + 1) >= MIN_SWITCH_INTERVAL:
        return None
    return max(MIN_SWITCH_INTERVAL, total_steps // 8)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def module_shapes(controller) -> list[tuple[int, int]]:
    return [L.shape for L in controller.layers]


def svd_cache_bytes(shapes: list[tuple[int, int]], r_target: int) -> int:
    """The SVD cache allowance: ``(m + n) * min(r_target, m, n)`` fp32 values per module."""
    return sum(4 * (m + n) * min(r_target, m, n) for m, n in shapes)


def ledger_bytes(shapes: list[tuple[int, int]], r: int, r_target: int) -> int:
    """The fused-pair ledger FB/FA: ``(m + n) * (K - r)`` fp32 values per module, K as above."""
    return sum(4 * (m + n) * max(min(r_target, m, n) - r, 0) for m, n in shapes)
