"""Nothing changes for users: every SRLoRAConfig variant trains to the numbers the code of commit
c7bf1de produced (tests/data/equivalence_c7bf1de.json, written by
tests/data/make_equivalence_golden.py): the same switch steps, slots, directions and pointers;
losses, pair scores and outputs within 1e-5 relative (fp32). Checkpoints written by c7bf1de
(tests/data/ckpt_c7bf1de/) load and continue to the same numbers."""

import json
import math
from pathlib import Path

import pytest

import equivalence_runs as R
import srlora

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "equivalence_c7bf1de.json").read_text())["runs"]
EXACT = (
    "step",
    "modules",
    "slots",
    "directions",
    "reason",
    "refreshed",
    "gradient",
    "optimizer_step",
)


def close(a, b, tol=1e-5) -> bool:
    """Relative 2-norm difference of two flat lists (nested lists flattened)."""

    def flat(x):
        return [v for y in x for v in flat(y)] if isinstance(x, list) else [float(x)]

    a, b = flat(a), flat(b)
    if len(a) != len(b):
        return False
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    den = math.sqrt(sum(y * y for y in b))
    return num <= tol * max(den, 1e-30)


def assert_same(got: dict, want: dict, losses_from: int = 0) -> None:
    assert [e["step"] for e in got["history"]] == [e["step"] for e in want["history"]]
    for g, w in zip(got["history"], want["history"]):
        assert set(g) == set(w), set(g) ^ set(w)
        for key in EXACT:
            assert g.get(key) == w.get(key), (g["step"], key, g.get(key), w.get(key))
        assert close(g["scores"], w["scores"]), g["step"]
    for key in ("pointers", "global_step", "num_switches"):
        assert got[key] == want[key], key
    assert close(got["losses"], want["losses"][losses_from:])
    assert close(got["output"], want["output"])


@pytest.mark.parametrize("name", list(R.CONFIGS))
def test_config_trains_to_the_numbers_of_c7bf1de(name):
    want = GOLDEN[name]
    if R.CONFIGS[name][0].get("method", "srlora") == "srlora":
        assert want["num_switches"] >= 2  # the run really switched
    assert_same(R.run(name), want)


@pytest.mark.parametrize("name", R.CHECKPOINTED)
def test_checkpoint_of_c7bf1de_loads_and_continues_to_the_same_numbers(name):
    model, ctl, opt = R.build(name)
    manifest = srlora.load_checkpoint(
        DATA / "ckpt_c7bf1de" / name, model=model, controller=ctl, optimizer=opt
    )
    assert manifest["step"] == R.CKPT_STEP == ctl.global_step
    losses = R.train(model, ctl, opt, R.CKPT_STEP, R.STEPS)
    assert_same(R.summary(model, ctl, losses), GOLDEN[name], losses_from=R.CKPT_STEP)
