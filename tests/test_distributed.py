"""SRLoRA under DDP with 2 gloo processes on the CPU: bitwise replicas, 2-proc == 1-proc, resume.

One 2-process run (tests/dist_worker.py, forked from this process so peft is imported once)
serves the three multi-process tests; the single-process references run here.
Tolerance of 2-process vs 1-process results (fp32): |a - b| <= 1e-6 + 1e-5 * |b| elementwise;
the switch decisions (which pairs, which directions) must be equal exactly.
"""

from __future__ import annotations

import dataclasses
import os

import peft  # noqa: F401  (imported once here, not in every forked worker)
import pytest
import torch

import dist_worker as w
from conftest import launch_workers
from example_launch import run_example
import srlora
from srlora.distributed import (
    assign_owners,
    check_engine,
    replica_state,
    sharding_reason,
    tensor_digest,
)

ATOL, RTOL = 1e-6, 1e-5  # fp32; measured worst case 2.4e-7 absolute (tests/dist_worker.py model)


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    return launch_workers(w.main, str(tmp_path_factory.mktemp("ddp2")), timeout=300.0)


def _bitwise_equal(a, b) -> bool:
    if torch.is_tensor(a):
        return (
            torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    return a == b


def _assert_states_close(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for k in ref:
        if k.endswith("/history"):
            assert [(e["step"], e["modules"], e["slots"], e["directions"]) for e in got[k]] == [
                (e["step"], e["modules"], e["slots"], e["directions"]) for e in ref[k]
            ], k
        elif torch.is_tensor(ref[k]) and ref[k].is_floating_point():
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL, msg=k)
        else:
            assert _bitwise_equal(got[k], ref[k]), k


def test_adapter_trained_and_switched(run2):
    rep = run2["reports"][0]
    assert rep["switches"] == 6 and [s for s, _ in rep["checked"]] == [4, 8, 12, 16, 20, 24]
    assert min(rep["change"]) > 0.05  # effective weights moved: equalities below are not trivial
    first, last = rep["losses"][:7], rep["losses"][-7:]
    assert sum(last) < 0.9 * sum(first)


def test_ranks_bitwise_identical_after_every_switch(run2):
    r0, r1 = run2["reports"]
    assert r0["checked"] == r1["checked"]  # assert_replicas_identical passed at every switch
    for name in (f"state{w.SAVE_AT}", "final"):
        s0, s1 = run2["load"](f"{name}_rank0.pt"), run2["load"](f"{name}_rank1.pt")
        assert sorted(s0) == sorted(s1)
        assert any(k.startswith("controller/modules/") and k.endswith("/FB") for k in s0)
        assert any(k.startswith("optimizer/") for k in s0)
        assert any(k.startswith("controller/importance/") for k in s0)
        bad = [k for k in s0 if not _bitwise_equal(s0[k], s1[k])]
        assert not bad, f"{name}: differ across ranks: {bad[:5]}"


def test_bf16_base_weights_bitwise_identical(run2):
    assert run2["reports"][0]["bf16"]["switches"] == 6
    s0, s1 = run2["load"]("bf16_rank0.pt"), run2["load"]("bf16_rank1.pt")
    residuals = [k for k in s0 if k.endswith("/residual")]  # half_fusion="residual"
    assert len(residuals) == 3 and all(s0[k].dtype == torch.int8 for k in residuals)
    assert all(s0[k].dtype == torch.bfloat16 for k in s0 if k.startswith("base/"))
    bad = [k for k in s0 if not _bitwise_equal(s0[k], s1[k])]
    assert not bad, f"differ across ranks: {bad[:5]}"


def test_adaptive_schedule_and_refresh_agree_across_ranks(run2):
    a0, a1 = (rep["adaptive_refresh"] for rep in run2["reports"])
    assert a0["losses"] != a1["losses"]  # each rank's own loss: the controller averages them
    assert a0["history"] == a1["history"] and a0["pointers"] == a1["pointers"]
    assert len(a0["checked"]) == len(a0["history"]) >= 3  # replicas identical after each
    assert any(refreshed for _, _, refreshed, _ in a0["history"])
    assert all(reason != "fixed" for _, reason, _, _ in a0["history"])


def test_gradient_insertion_agrees_across_ranks(run2):
    g0, g1 = (rep["gradient"] for rep in run2["reports"])
    assert g0["history"] == g1["history"] and g0["U"] == g1["U"]
    assert len(g0["checked"]) == len(g0["history"]) >= 3  # replicas identical after each
    assert all(all(used) for _, used, _ in g0["history"])
    # the directions come from the gradient of the whole global batch: one process agrees
    model, ctl = srlora.wrap(
        w.build_base(), dataclasses.replace(w.config(), total_steps=12, insertion="gradient")
    )
    opt = w.make_optimizer(model)
    ctl.attach(opt)
    w.train_steps(model, opt, ctl, 0, 12)
    assert [[e["step"], e["gradient"], e["slots"]] for e in ctl.history] == g0["history"]
    one = [st.U.sum().item() for st in ctl.modules]
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(g0["U"], one)), (g0["U"], one)


def test_replica_check_catches_one_ulp_and_different_checkpoints(run2):
    for rep in run2["reports"]:
        assert "1 of" in rep["perturbed"] and "fc2.lora_B" in rep["perturbed"]
        assert "ranks [1] differ" in rep["perturbed"]
        assert "target weight(s) before the SVD set-up differ" in rep["diverged_inputs"]


def test_svd_failure_on_one_rank_raises_on_every_rank(run2):
    r0, r1 = run2["reports"]
    assert "failed on another rank" in r0["svd_failure"]
    assert r1["svd_failure"] == "injected SVD failure"


def test_svd_set_up_split_across_ranks(run2):
    s0, s1 = (rep["svd"] for rep in run2["reports"])
    costs = [32 * 24 * 16, 32 * 32 * 16, 4 * 32 * 4]  # m * n * k of fc1, fc2, head
    assert s0["owners"] == s1["owners"] == assign_owners(costs, 2)
    assert sorted(s0["computed"] + s1["computed"]) == [0, 1, 2]
    assert s0["computed"] and s1["computed"]


def test_two_processes_match_one_process(run2):
    model, controller, optimizer = w.new_run()
    w.train_steps(model, optimizer, controller, 0, w.TOTAL_STEPS)
    ref = replica_state(model, controller, optimizer)
    _assert_states_close(run2["load"]("final_rank0.pt"), ref)


def test_resume_in_one_process_from_distributed_checkpoint(run2):
    model, controller, optimizer = w.new_run()
    w.load_training_state(os.path.join(run2["out"], "ckpt"), model, controller, optimizer)
    saved = run2["load"](f"state{w.SAVE_AT}_rank0.pt")
    now = replica_state(model, controller, optimizer)
    assert sorted(now) == sorted(saved)
    bad = [k for k in saved if not _bitwise_equal(now[k], saved[k])]
    assert not bad, f"not restored bitwise: {bad[:5]}"
    w.train_steps(model, optimizer, controller, w.SAVE_AT, w.TOTAL_STEPS)
    assert controller.num_switches == 6
    _assert_states_close(
        replica_state(model, controller, optimizer), run2["load"]("final_rank0.pt")
    )


# ------------------------------------------------------------------ single-process unit tests
def test_assign_owners_balances_and_is_round_robin_for_equal_costs():
    assert assign_owners([1.0] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign_owners([1, 1, 1, 1, 5], 2) == [1, 1, 1, 1, 0]
    assert assign_owners([3, 2, 2], 1) == [0, 0, 0]
    with pytest.raises(ValueError):
        assign_owners([1], 0)


def test_tensor_digest_is_bitwise():
    x = torch.randn(7, 5)
    y = x.clone()
    assert tensor_digest(x) == tensor_digest(y)
    y.view(-1)[11] = torch.nextafter(y.view(-1)[11], torch.tensor(float("inf")))
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x) != tensor_digest(x.double())
    assert tensor_digest(x) != tensor_digest(x.reshape(5, 7))
    assert tensor_digest(x.bfloat16()) == tensor_digest(x.bfloat16().clone())


def test_wrap_refused_under_accelerate_fsdp_or_deepspeed_launch(monkeypatch):
    for var, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(var, "true")
        base = w.build_base()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(srlora.UnsupportedEngineError, match=engine) as e:
            srlora.wrap(base, w.config())
        assert "torchrun" in str(e.value) and "Accelerate" in str(e.value)
        assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
        monkeypatch.delenv(var)
    srlora.wrap(w.build_base(), srlora.SRLoRAConfig(r=4, target_modules=["fc1"], method="lora"))


def test_accelerator_with_sharded_engine_refused(monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    Accelerator(cpu=True)
    assert sharding_reason() is None
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", kind)
        with pytest.raises(srlora.UnsupportedEngineError, match=kind.name):
            srlora.wrap(w.build_base(), w.config())


def test_deepspeed_objects_refused():
    engine_cls = type(
        "DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"}
    )
    eng = engine_cls()
    eng.add_module("inner", w.build_base())
    assert "DeepSpeed" in sharding_reason(eng)
    model, controller, optimizer = w.new_run()
    wrapper = type("DeepSpeedOptimizerWrapper", (), {"__module__": "accelerate.utils.deepspeed"})()
    wrapper.optimizer = optimizer
    with pytest.raises(srlora.UnsupportedEngineError, match="DeepSpeed"):
        controller.attach(wrapper)
    zero3 = torch.nn.Parameter(torch.zeros(3))
    zero3.ds_id = 0  # what ZeRO-3 tags its partitioned parameters with
    assert "ZeRO-3" in sharding_reason(None, torch.optim.SGD([zero3], lr=0.1))
    check_engine(model, optimizer)  # plain model and optimizer: accepted


def test_accelerate_single_process_attach_counts_optimizer_steps():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, controller, optimizer = w.new_run()
    model, optimizer = accelerator.prepare(model, optimizer)
    controller.attach(optimizer)  # AcceleratedOptimizer: unwrapped to the torch optimizer
    for micro in range(8):
        with accelerator.accumulate(model):
            x, y = w.global_batch(micro)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    assert controller.global_step == 4 and controller.importance_updates == 4
    assert controller.num_switches == 1  # the switch after optimizer step 4, not micro-step 4


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_refused_at_wrap_attach_and_switch(one_process_group):
    from torch.distributed.fsdp import fully_shard

    base = w.build_base()
    fully_shard(base)
    with pytest.raises(srlora.UnsupportedEngineError, match="FSDP") as e:
        srlora.wrap(base, w.config())
    assert "torchrun" in str(e.value)
    model, controller = srlora.wrap(w.build_base(), w.config())  # sharded after wrap():
    fully_shard(model)
    optimizer = w.make_optimizer(model)
    with pytest.raises(srlora.UnsupportedEngineError, match="FSDP"):
        controller.attach(optimizer)
    W0 = controller.layers[0].base_weight.full_tensor().clone()
    with pytest.raises(srlora.UnsupportedEngineError, match="FSDP"):
        controller.switch_now()  # the manual path (no attach) is refused before any edit
    assert torch.equal(controller.layers[0].base_weight.full_tensor(), W0)


def test_sharding_after_a_switch_is_refused_at_the_next(one_process_group):
    """The switch walks the model again only when the parameters it edits changed identity:
    FSDP2 sharding after a first switch must still be caught at the next one."""
    from torch.distributed.fsdp import fully_shard

    model, controller = srlora.wrap(w.build_base(), w.config())
    controller.importance.updates += 1  # scores do not matter here
    assert controller.switch_now() > 0  # walked once, parameters remembered
    assert controller.switch_now() > 0  # same parameters: no walk, still switches
    fully_shard(model)
    W0 = controller.layers[0].base_weight.full_tensor().clone()
    with pytest.raises(srlora.UnsupportedEngineError, match="FSDP"):
        controller.switch_now()
    assert torch.equal(controller.layers[0].base_weight.full_tensor(), W0)


def test_fsdp1_flat_parameters_refused():
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.zeros(6), requires_grad=True)
    assert "FSDP" in sharding_reason(None, torch.optim.SGD([flat], lr=0.1))


# ------------------------------------------------------------------ the documented examples
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_rerun_only_for_a_teardown_abort_after_the_checks():
    """The example tests repeat a run once only when its checks all passed and a rank then
    aborted in teardown; any other failure fails at once."""
    from example_launch import aborted_after_the_work

    done, abort = "replicas identical: 224 entries", "terminate called without an active exception"
    assert aborted_after_the_work(done + "\n", "...\n" + abort + "\n")
    assert not aborted_after_the_work("step 4 loss 0.67\n", abort)  # died before the checks
    assert not aborted_after_the_work(done, "AssertionError: replicas differ")


@pytest.mark.slow
def test_torchrun_example():
    out = run_example(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            "examples/torchrun_train.py",
            "--steps",
            "20",
        ]
    )
    last = out.strip().splitlines()[-1]
    assert last.startswith("replicas identical:") and "on 2 ranks" in last, out[-2000:]
    assert "20 optimizer steps and 6 switches" in last


@pytest.mark.slow
def test_accelerate_example_with_gradient_accumulation():
    out = run_example(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "examples/accelerate_train.py",
            "--steps",
            "12",
            "--grad-accum",
            "2",
        ]
    )
    last = out.strip().splitlines()[-1]
    assert last.startswith("replicas identical:") and "on 2 ranks" in last, out[-2000:]
    assert "12 optimizer steps (24 micro-batches per rank) and 6 switches" in last


def test_docs_excerpts_are_in_the_examples():
    import re

    text = open(os.path.join(ROOT, "docs", "distributed.md")).read()
    blocks = re.findall(r"```python\n# excerpt of (\S+)\n(.*?)```", text, re.S)
    assert len(blocks) == 3  # torchrun, Accelerate, FSDP2
    for path, body in blocks:
        source = {line.strip() for line in open(os.path.join(ROOT, path))}
        for line in body.splitlines():
            if line.strip() and not line.strip().startswith("# ..."):
                assert line.strip() in source, f"{path}: {line.strip()!r}"
