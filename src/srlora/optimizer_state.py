"""What a switch does to the optimizer's state of the reinitialized slots
(``SRLoRAConfig.optimizer_state``).

* ``"zero"``: zero every parameter-shaped state tensor (Adam's moments, SGD's momentum, ...) of the
  reinitialized rows of A and columns of B (ReLoRA);
* ``"keep"``: leave it (GaLore);
* ``"rewarm"``: zero it as ``"zero"`` does; then, after every optimizer step, each restarted slot's
  Adam update is bias-corrected from its own restart (:mod:`srlora.rewarm`).
"""

from __future__ import annotations

import torch

from .layers import AdaptedLayer


def slot_states(optimizer: torch.optim.Optimizer, Ls: list[AdaptedLayer]) -> list[dict]:
    """For A and for B of the layers ``Ls``: state key -> (positions in ``Ls``, 2-D views of that
    state), for every state tensor shaped like its parameter."""
    out = []
    for params in ([L.lora_A for L in Ls], [L.lora_B for L in Ls]):
        per_key: dict = {}
        for g, p in enumerate(params):
            for key, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    gs, vs = per_key.setdefault(key, ([], []))
                    gs.append(g)
                    vs.append(v.view(v.shape[0], -1))
        out.append(per_key)
    return out


@torch.no_grad()
def zero_slots_(
    optimizer: torch.optim.Optimizer, Ls: list[AdaptedLayer], hit: torch.Tensor
) -> None:
    """Zero the optimizer state of the reinitialized rows of A and columns of B of the layers
    ``Ls`` (``hit``: ``G x r`` bool, true at the reinitialized slots). Per state key: the 2-D
    views stacked, one ``masked_fill_`` of exact zeros (NaN state included), one
    ``_foreach_copy_`` back."""
    masks = (hit[:, :, None], hit[:, None, :])  # rows of A, columns of B
    for per_key, mask in zip(slot_states(optimizer, Ls), masks):
        for gs, vs in per_key.values():
            at = mask if len(gs) == len(Ls) else mask[gs]
            zeroed = torch.stack(vs).masked_fill_(at.to(vs[0].device), 0.0)
            torch._foreach_copy_(vs, list(zeroed.unbind(0)))


def apply_policy(policy: str, optimizer, Ls: list[AdaptedLayer], hit: torch.Tensor) -> None:
    """Apply ``SRLoRAConfig.optimizer_state`` to the slots ``hit`` of the layers ``Ls``."""
    if policy in ("zero", "rewarm"):
        zero_slots_(optimizer, Ls, hit)
