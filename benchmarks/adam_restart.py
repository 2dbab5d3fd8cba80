"""How large AdamW's updates of a slot are after its moments are zeroed at step t0 while the step
counter runs on (SRLoRA's optimizer_state="zero"), as a multiple of the learning rate.

A constant gradient, torch's bias correction with the global step t = t0 + tau:
update / lr = (m / (1 - b1^t)) / sqrt(v / (1 - b2^t)). Run: python benchmarks/adam_restart.py
"""
import math

B1, B2 = 0.9, 0.999
TAUS = (1, 3, 10, 30, 100, 300, 1000, 3000)

print("t0      " + "".join(f"tau={t:<6}" for t in TAUS))
for t0 in (100, 1000, 10000):
    m = v = 0.0
    row = {}
    for tau in range(1, max(TAUS) + 1):
        t = t0 + tau
        m = B1 * m + (1 - B1)
        v = B2 * v + (1 - B2)
        if tau in TAUS:
            row[tau] = (m / (1 - B1 ** t)) / math.sqrt(v / (1 - B2 ** t))
    print(f"{t0:<8}" + "".join(f"{row[t]:<10.2f}" for t in TAUS))
