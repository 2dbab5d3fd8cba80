"""Seconds per training step and per evaluated example of each built-in task, for sizing a study.

    OMP_NUM_THREADS=1 python studies/measure_step_time.py [ROUNDS]

One srlora run of 10 steps per task (lr 1e-3, the task's defaults, eval of 100 test examples),
the tasks interleaved round by round so that every task sees the same machine load; prints
``train_time_s / 10`` and ``eval_time_s / 100`` per task and round. docs/study.md ("Sizing")
used two rounds of this (with the 30-step runs of an earlier version of it).
"""

import os
import sys

import torch

from srlora_lab.experiments import models, runner, tasks

TASKS = [("rt-polarity", 40), ("bbc-news", 64), ("fashion-mnist", 64), ("mnist", 64)]


def main(rounds: int = 2) -> None:
    torch.set_num_threads(1)
    prep = {}
    for name, max_len in TASKS:
        t = tasks.TASKS[name]
        d = t.defaults
        data = t.loader()
        sp = tasks.split(data, 0, max_val=d["max_val"], max_test=d["max_test"])
        b = models.load_model(t.model, data.kind, len(data.label_names))
        prep[name] = (b, b.encode(data, max_len=max_len, image_size=64), sp, d)
    for rnd in range(rounds):
        for name, (b, enc, sp, d) in prep.items():
            rec = runner.run_one(
                b,
                enc,
                sp,
                method="srlora",
                seed=0,
                lr=1e-3,
                steps=10,
                batch_size=d["batch_size"],
                r=d["r"],
                lora_alpha=d["lora_alpha"],
                r_target=d["r_target"],
                eval_every=10,
                eval_size=100,
                head_lr=1e-3,
                progress=False,
                eval_val=False,
            )
            print(
                f"round {rnd} {name:14s} train {rec['train_time_s'] / 10:.3f} s/step  eval "
                f"{rec['eval_time_s'] / 100:.4f} s/example  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
