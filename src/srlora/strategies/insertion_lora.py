"""``insertion="lora"`` (ReLoRA's restart): a recomposed slot starts as PEFT's LoRA init, ``B``
zero and ``A`` kaiming-uniform (``a = sqrt(5)``: uniform in ``+-1/sqrt(n)``), so the new pair
adds nothing and nothing is subtracted from the frozen weight; the adapter's first slots start
the same way (PEFT's init, the base weight untouched). No SVD is computed: the cache holds zero
singular values there (``S = 0``, whose PiSSA product is the zero the switch subtracts),
and the ledger of
fused pairs keeps the export exact. Each new ``A`` is drawn from a generator seeded by
(``svd_seed``, step, module), so every process and a resumed run draw the same."""

from __future__ import annotations

import math

import torch

from .base import register
from .insertion import Inserted, Insertion


def lora_a(k: int, n: int, seed: int) -> torch.Tensor:
    """``k x n`` fp32 kaiming-uniform with ``a = sqrt(5)`` (PEFT's LoRA A init), seeded."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(n)
    return torch.empty(k, n).uniform_(-bound, bound, generator=g)


@register
class LoRAInsertion(Insertion):
    name = "lora"
    reads_directions = False
    fsdp2 = False  # FSDP2 needs fusion="virtual", which this insertion refuses
    refuses = {
        "fusion": (
            ("virtual",),
            "needs fusion='weight' (the side path of fusion='virtual' is built for SVD directions)",
        )
    }

    def insert(self, U, S, Vh, scaling, B, A, slots, grads, seeds):
        G, m, k = U.shape
        n = Vh.shape[-1]
        B_new = torch.zeros(G, m, k, device=U.device)
        base = self.config.svd_seed * 1_000_000_007
        A_new = torch.stack([lora_a(k, n, base + s) for s in seeds]).to(U.device)
        zero = torch.zeros_like(S)  # whatever the cache held: s*B_new@A_new = 0 = U diag(0) Vh
        return Inserted(U, zero, Vh, B_new, A_new, written=True)
