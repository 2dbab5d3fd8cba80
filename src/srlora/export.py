"""Export a trained SRLoRA (or LoRA / PiSSA) model: a plain PEFT adapter, or merged weights.

``export_adapter`` writes an ordinary PEFT LoRA adapter relative to the ORIGINAL base weights:
per module, ``W_eff - W0 == s * Bd @ Ad`` (the controller's ledger, ``delta_factors``), stored
as ``lora_B = Bd`` and ``lora_A = Ad`` with ``rank_pattern``/``alpha_pattern`` set so that PEFT's
scaling ``alpha / r`` equals ``s`` for every module. ``PeftModel.from_pretrained(original_base,
path)`` then computes what the trained model computes. Optionally each delta is compressed to a
rank or an energy fraction, exactly truncating its SVD, and the error introduced is reported.

``save_merged`` writes ``W + s*B@A`` per layer into a copy of the model and saves it in the base
model's own format (``save_pretrained`` for transformers models); a bitsandbytes base is
dequantized first (the merged model is full precision).

On a bitsandbytes base (``fusion="virtual"``) "the ORIGINAL base" is the quantized base: the
exported adapter, loaded on the same quantized model, computes what the trained model computed
(the side path is in ``Bd``/``Ad``).

Shape legend: ``m`` out, ``n`` in, ``R`` rank of the delta factors, ``k`` rank kept.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ._errors import SRLoRAError
from .controller import SRLoRAController
from .guards import MODEL_FILES, check_not_overwriting, move_into

EXPORT_INFO = "srlora_export.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", EXPORT_INFO)
_PREFIX = "base_model.model."

__all__ = ["export_adapter", "save_merged", "delta_svd", "truncate_delta", "ExportResult"]


# ---------------------------------------------------------------------- the math (pure)
def delta_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the low-rank product ``B @ A`` (m x R times R x n) without forming it.

    ``B = Qb Rb``, ``A^T = Qa Ra`` (reduced QR), ``Rb Ra^T = Uc diag(S) Vch``; then
    ``B @ A == (Qb Uc) diag(S) (Vch Qa^T)``. Cost O((m + n) R^2 + R^3). Returns ``U`` (m x q),
    ``S`` (q, descending), ``Vh`` (q x n), q = min(m, n, R), in the inputs' dtype.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ Uc, S, Vch @ Qa.T


def truncate_delta(
    B: torch.Tensor, A: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of ``B @ A`` (Eckart-Young), computed in fp64.

    k is ``rank``, or the smallest k whose singular values hold ``energy`` of the squared
    Frobenius norm (at least 1). Returns ``(B_k, A_k, err)`` with ``B_k @ A_k`` the truncated
    SVD (factors split as ``U sqrt(S)``, ``sqrt(S) Vh``) and ``err = |BA - B_k A_k|_F / |BA|_F
    = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)`` (0 for a zero delta).
    """
    U, S, Vh = delta_svd(B.double(), A.double())
    sq = S * S
    total = float(sq.sum())
    if rank is not None:
        k = min(rank, S.numel())
    else:
        frac = torch.cumsum(sq, 0) / total if total > 0 else torch.ones_like(sq)
        k = int((frac < energy * (1 - 1e-12)).sum()) + 1
    k = max(1, min(k, S.numel()))
    root = S[:k].sqrt()
    err = math.sqrt(float(sq[k:].sum()) / total) if total > 0 else 0.0
    return U[:, :k] * root, root[:, None] * Vh[:k], err


# ---------------------------------------------------------------------- results
@dataclass
class ExportResult:
    """What ``export_adapter`` wrote. ``ranks`` and ``errors`` are per module (base-model names);
    ``errors`` are relative Frobenius errors of each delta (0.0 when exported exactly) and
    ``error`` is the same over all modules together."""

    path: str
    method: str
    rank: int
    ranks: dict[str, int]
    alphas: dict[str, float]
    errors: dict[str, float]
    error: float
    compressed: bool
    target_rank: Optional[int] = None
    target_energy: Optional[float] = None
    step: int = 0
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _relative_name(layer_name: str) -> str:
    return layer_name[len(_PREFIX) :] if layer_name.startswith(_PREFIX) else layer_name


def _check_exportable(peft_cfg) -> None:
    if getattr(peft_cfg, "use_dora", False) or getattr(peft_cfg, "lora_bias", False):
        raise SRLoRAError(
            "export_adapter: DoRA / lora_bias adapters are not plain low-rank "
            "deltas and cannot be exported exactly"
        )


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------- export_adapter
@torch.no_grad()
def export_adapter(
    model,
    controller: SRLoRAController,
    path,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a plain PEFT LoRA adapter, relative to the ORIGINAL base weights, into ``path``.

    Without ``rank``/``energy`` the export is exact: per module the rank is ``r + (p - r) + p``
    for SRLoRA (live pairs, fused pairs, subtracted directions), ``2r`` for PiSSA, ``r`` for
    LoRA. With ``rank`` (an int) or ``energy`` (a fraction in (0, 1]) each delta is truncated to
    its best approximation of that rank / energy, and the relative error is reported.
    ``modules_to_save`` weights are included. Load with
    ``PeftModel.from_pretrained(original_base_model, path)``. The live model is not changed.
    Writes ``adapter_model.safetensors``, ``adapter_config.json`` and ``srlora_export.json``
    (ranks and errors); returns the same as an :class:`ExportResult`. A folder that already
    holds one of these files is refused (``FileExistsError``, nothing written) unless
    ``overwrite=True``.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if model is not controller.model:
        raise ValueError("model is not the model this controller adapts")
    if rank is not None and energy is not None:
        raise ValueError("export_adapter: give rank or energy, not both")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"export_adapter: rank must be an integer >= 1, got {rank!r}")
    if energy is not None and (
        not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0.0 < energy <= 1.0
    ):
        raise ValueError(f"export_adapter: energy must be in (0, 1], got {energy!r}")
    check_not_overwriting(path, ADAPTER_FILES, overwrite, "export_adapter")
    adapter = controller.layers[0].adapter if controller.layers else "default"
    peft_cfg = model.peft_config[adapter]
    _check_exportable(peft_cfg)
    compress = rank is not None or energy is not None

    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()
    }
    ranks, alphas, errors = {}, {}, {}
    dropped = kept = 0.0  # squared Frobenius norms of s * delta, over all modules
    for i, L in enumerate(controller.layers):
        Bd, Ad = controller.delta_factors(i)
        s = L.scaling
        if compress and (rank is None or rank < Bd.shape[1]):
            Bk, Ak, err = truncate_delta(Bd, Ad, rank=rank, energy=energy)
        else:
            Bk, Ak, err = Bd.double(), Ad.double(), 0.0
        if compress:
            norm2 = float((s * s) * _frob2(Bd.double(), Ad.double()))
            kept += norm2
            dropped += norm2 * err * err
        k = Bk.shape[1]
        name = _relative_name(L.name)
        ranks[name], alphas[name], errors[name] = k, s * k, err
        a_shape = (k,) + tuple(L.lora_A.shape[1:])
        b_shape = (L.lora_B.shape[0], k) + tuple(L.lora_B.shape[2:])
        for key, t in (
            (f"{L.name}.lora_A.weight", Ak.reshape(a_shape)),
            (f"{L.name}.lora_B.weight", Bk.reshape(b_shape)),
        ):
            if key not in tensors:
                raise SRLoRAError(f"export_adapter: PEFT's state dict has no {key}")
            tensors[key] = t.float().cpu().contiguous()
    total_error = math.sqrt(dropped / kept) if kept > 0 else 0.0

    cfg = copy.deepcopy(peft_cfg)
    top = max(ranks.values()) if ranks else peft_cfg.r
    first_scaling = controller.layers[0].scaling if controller.layers else 1.0
    cfg.r, cfg.lora_alpha = top, first_scaling * top
    cfg.rank_pattern, cfg.alpha_pattern = dict(ranks), dict(alphas)
    cfg.init_lora_weights = True
    cfg.use_rslora = False
    cfg.inference_mode = True
    _check_patterns(cfg, ranks)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        out / "adapter_model.safetensors",
        lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
    )
    cfg.save_pretrained(str(out))
    result = ExportResult(
        path=str(out),
        method=controller.config.method,
        rank=top,
        ranks=ranks,
        alphas=alphas,
        errors=errors,
        error=total_error if compress else 0.0,
        compressed=compress,
        target_rank=rank,
        target_energy=energy,
        step=controller.global_step,
        modules_to_save=list(peft_cfg.modules_to_save or []),
    )
    _write_atomic(
        out / EXPORT_INFO,
        lambda p: p.write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True)),
    )
    return result


def _frob2(B: torch.Tensor, A: torch.Tensor) -> float:
    """``|B @ A|_F^2 = trace((B^T B)(A A^T))`` without forming the m x n product."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def _check_patterns(cfg, ranks: dict[str, int]) -> None:
    """Every module must resolve to its own rank_pattern key (PEFT matches keys as regexes)."""
    from peft.utils.other import get_pattern_key

    keys = list(cfg.rank_pattern)
    for name in ranks:
        if get_pattern_key(keys, name) != name:
            raise SRLoRAError(
                f"export_adapter: module {name!r} matches another module's "
                "rank_pattern key; rename modules or export without patterns"
            )


# ---------------------------------------------------------------------- save_merged
@torch.no_grad()
def save_merged(
    model, controller: SRLoRAController, path, safe_merge: bool = True, overwrite: bool = False
):
    """Save the trained model with ``W + s*B@A`` merged into every adapted layer.

    Works on a deep copy (PEFT's ``merge_and_unload``), so the live training model is left as
    it was; the copy needs as much memory as the model. A transformers model is saved with its
    own ``save_pretrained`` (loadable with ``from_pretrained``); any other module as
    ``model.safetensors`` holding its ``state_dict()`` (load with
    ``safetensors.torch.load_model``). Returns the output directory.

    A bitsandbytes 4-bit / 8-bit base is not merged back into quantized weights (that would
    round the trained change to 4 bits): the copy is dequantized (every bitsandbytes layer
    becomes an ``nn.Linear``, transformers' ``quantization_config`` is dropped) and each adapted
    layer holds ``deq(Wq) + s*Bd@Ad``, one rounding to the dequantized dtype. It computes what
    the trained model computes up to that rounding (and, for 8-bit, up to the int8 kernel's
    own activation rounding, which the full-precision model no longer does).

    A folder that already holds model files (``config.json``, ``model.safetensors``, shards, ...)
    is refused (``FileExistsError``, checked before the merge and again before the files are
    moved in from a temporary folder beside it) unless ``overwrite=True``.
    """
    if model is not controller.model:
        raise ValueError("model is not the model this controller adapts")
    out = Path(path)
    check_not_overwriting(out, MODEL_FILES, overwrite, "save_merged")
    if any(L.quantized for L in controller.layers):  # bitsandbytes: a full-precision model
        _check_exportable(model.peft_config[controller.layers[0].adapter])
        merged = dequantized_copy(model)
        _merge_virtual_(merged, controller)
    else:
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=safe_merge)
        if controller.config.fusion == "virtual":  # the side path is not in PEFT's merge
            _merge_virtual_(merged, controller)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:  # written beside the target, then moved in: nothing there is replaced unless asked
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(str(tmp))
        else:
            from safetensors.torch import save_model

            save_model(merged, str(tmp / "model.safetensors"))
        move_into(tmp, out, overwrite, "save_merged")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def dequantized_copy(model):
    """A deep copy of the PEFT ``model`` without its LoRA layers (not merged) and with every
    bitsandbytes layer replaced by an ``nn.Linear`` holding its dequantized weight: through
    transformers' ``dequantize()`` for a model it quantized (which also drops the config's
    ``quantization_config``), else layer by layer."""
    from .layers import bnb_kind, dequantize_bnb

    base = copy.deepcopy(model).unload()
    if getattr(base, "hf_quantizer", None) is not None:
        return base.dequantize()
    for name, mod in list(base.named_modules()):
        if name and bnb_kind(mod):
            W = dequantize_bnb(mod)
            lin = torch.nn.Linear(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                dtype=W.dtype,
                device=W.device,
            )
            lin.weight.data.copy_(W)
            if mod.bias is not None:
                lin.bias.data.copy_(mod.bias.data)
            base.set_submodule(name, lin)
    return base


def _merge_virtual_(merged, controller: SRLoRAController) -> None:
    """With ``fusion="virtual"`` the live weight is W0: write ``W0 + s*Bd@Ad`` (fp32, one
    rounding to the weight's dtype) into each merged layer of ``merged`` (for a bitsandbytes
    base ``W0`` is the dequantized weight)."""
    for i, L in enumerate(controller.layers):
        w = merged.get_submodule(_relative_name(L.name)).weight.data
        view = w.T if getattr(L.layer, "fan_in_fan_out", False) else w.reshape(w.shape[0], -1)
        Bd, Ad = controller.delta_factors(i)
        W0 = L.W()
        view.copy_(
            torch.addmm(W0.float(), Bd.to(W0.device), Ad.to(W0.device), alpha=L.scaling).to(
                view.dtype
            )
        )
