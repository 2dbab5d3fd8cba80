"""How large AdamW's updates of a slot are after its moments are zeroed at step t0 while the step
counter runs on (SRLoRA's optimizer_state="zero"), as a multiple of the learning rate.

A constant gradient, torch's bias correction with the global step t = t0 + tau:
update / lr = (m / (1 - b1^t)) / sqrt(v / (1 - b2^t)). Run: python benchmarks/adam_restart.py
The second table is a short run's: bbc-lm's switches (120 steps, one every 17), each slot's
largest multiple before the run ends and the tau where it falls.
"""

import math

B1, B2 = 0.9, 0.999
TAUS = (1, 3, 10, 30, 100, 300, 1000, 3000)


def multiples(t0: int, horizon: int) -> list[float]:
    """update / lr at tau = 1 .. horizon after a restart at step t0."""
    m = v = 0.0
    out = []
    for tau in range(1, horizon + 1):
        t = t0 + tau
        m = B1 * m + (1 - B1)
        v = B2 * v + (1 - B2)
        out.append((m / (1 - B1**t)) / math.sqrt(v / (1 - B2**t)))
    return out


print("t0      " + "".join(f"tau={t:<6}" for t in TAUS))
for t0 in (100, 1000, 10000):
    row = multiples(t0, max(TAUS))
    print(f"{t0:<8}" + "".join(f"{row[t - 1]:<10.2f}" for t in TAUS))

print("\nbbc-lm (120 steps): t0, first update, largest multiple before step 120, at tau")
for t0 in (17, 34, 51, 68, 85, 102):
    row = multiples(t0, 120 - t0)
    peak = max(row)
    print(f"{t0:<8}{row[0]:<8.2f}{peak:<8.2f}{row.index(peak) + 1}")
