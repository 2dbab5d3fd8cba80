"""SRLoRA under FSDP2 (fully_shard) with 2 gloo processes on the CPU, against one process.

One 2-process run (tests/fsdp_worker.py, forked from this process) trains a sharded model through
6 switches, saves a checkpoint at step 10 from the sharded run, continues, and resumes a second
sharded run from that checkpoint. The single-process references run here.
Tolerance of sharded vs single-process results (fp32): per tensor,
max |a - b| <= 1e-6 * max |b| (measured worst 3.7e-7, an Adam moment); the importance state is
~1e-6 in size, so the bound is relative to each tensor's scale. Switch decisions (steps, modules,
slots, directions) must be equal exactly; across ranks and across the resume, bitwise.
"""

from __future__ import annotations

import os

import peft  # noqa: F401  (imported once here, not in every forked worker)
import pytest
import torch

import fsdp_worker as w
from conftest import launch_workers
import srlora
from srlora import fsdp
from srlora.engines import check_engine, sharding_reason

SCALE_TOL = 1e-6


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    return launch_workers(w.main, str(tmp_path_factory.mktemp("fsdp2")), timeout=240.0)


@pytest.fixture(scope="module")
def reference():
    """The single-process run on the same global batches: its whole state at SAVE_AT and at the
    end."""
    torch.set_num_threads(1)
    model, controller, optimizer = w.new_run(shard=False)
    w.train_steps(model, optimizer, controller, 0, w.SAVE_AT)
    at_save = w.whole_state(model, controller, optimizer)
    w.train_steps(model, optimizer, controller, w.SAVE_AT, w.TOTAL_STEPS)
    return {
        "save": at_save,
        "final": w.whole_state(model, controller, optimizer),
        "history": controller.history,
    }


def _bitwise_equal(a, b) -> bool:
    if torch.is_tensor(a):
        return (
            torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    return a == b


def _decisions(history: list) -> list:
    return [(h["step"], h["modules"], h["slots"], h["directions"]) for h in history]


def _assert_close_to_reference(got: dict, ref: dict) -> float:
    """Returns the worst max |a - b| / max |b| over the float tensors."""
    assert set(got) == set(ref)
    worst = 0.0
    for k, b in ref.items():
        a = got[k]
        if k == "controller/history":
            assert _decisions(a) == _decisions(b)
            for ha, hb in zip(a, b):
                torch.testing.assert_close(
                    torch.tensor(ha["scores"]), torch.tensor(hb["scores"]), rtol=1e-5, atol=0.0
                )
        elif torch.is_tensor(b) and b.dtype.is_floating_point:
            assert a.shape == b.shape and a.dtype == b.dtype, k
            err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
            assert err <= SCALE_TOL * b.abs().max().item(), (k, err, b.abs().max().item())
            worst = max(worst, err / max(b.abs().max().item(), 1e-30))
        else:
            assert _bitwise_equal(a, b), k
    return worst


def test_sharded_run_matches_one_process(run2, reference):
    """Through 6 switches (3 before the checkpoint): LoRA factors, side buffers, SVD cache,
    ledger, importance state, optimizer state and switch decisions as one process computes them
    on the whole batch."""
    rep = run2["reports"][0]
    assert rep["switches"] == 6 and _decisions(rep["history"]) == _decisions(reference["history"])
    assert rep["local_rows_A"] == [[0, 2]] * 3  # r=3 over 2 ranks: uneven shards of lora_A
    assert run2["reports"][1]["local_rows_A"] == [[2, 3]] * 3
    assert any(2 in slots for h in rep["history"] for slots in h["slots"])  # rank 1's row
    assert any(s < 2 for h in rep["history"] for slots in h["slots"] for s in slots)  # rank 0's
    for phase in ("save", "final"):
        state = run2["load"](f"{phase}_rank0.pt")
        assert any(k.startswith("side/") for k in state)
        worst = _assert_close_to_reference(state, reference[phase])
        print(f"2 ranks vs 1 process at {phase}: worst max|a-b|/max|b| = {worst:.2g}")


def test_ranks_hold_bitwise_the_same_whole_state(run2):
    for phase in ("save", "final"):
        a, b = run2["load"](f"{phase}_rank0.pt"), run2["load"](f"{phase}_rank1.pt")
        assert set(a) == set(b)
        assert [k for k in a if not _bitwise_equal(a[k], b[k])] == []
    for rep in run2["reports"]:
        assert [s for s, _ in rep["checked"]] == [3, 6, 9, 12, 15, 18]  # replica check per switch
    assert run2["reports"][0]["history"] == run2["reports"][1]["history"]


def test_checkpoint_from_the_sharded_run_resumes_sharded_bitwise(run2):
    """save_checkpoint on every rank (rank 0 writes), load_checkpoint into a fresh sharded run:
    the state is restored bitwise, and the continuation equals the uninterrupted run bitwise."""
    for r in range(2):
        loaded, saved = run2["load"](f"loaded_rank{r}.pt"), run2["load"](f"save_rank{r}.pt")
        assert [k for k in saved if not _bitwise_equal(loaded[k], saved[k])] == []
        resumed, final = run2["load"](f"resumed_rank{r}.pt"), run2["load"](f"final_rank{r}.pt")
        assert [k for k in final if not _bitwise_equal(resumed[k], final[k])] == []


def test_checkpoint_from_the_sharded_run_resumes_and_exports_in_one_process(
    run2, reference, tmp_path
):
    from peft import PeftModel

    model, controller, optimizer = w.new_run(shard=False)
    srlora.load_checkpoint(
        os.path.join(run2["out"], "ckpt"), model=model, controller=controller, optimizer=optimizer
    )
    saved = run2["load"]("save_rank0.pt")
    now = w.whole_state(model, controller, optimizer)
    assert [k for k in saved if not _bitwise_equal(now[k], saved[k])] == []
    w.train_steps(model, optimizer, controller, w.SAVE_AT, w.TOTAL_STEPS)
    _assert_close_to_reference(w.whole_state(model, controller, optimizer), reference["final"])

    srlora.export_adapter(model, controller, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(w.build_base(), str(tmp_path / "adapter")).eval()
    x, _ = w.global_batch(999)
    with torch.no_grad():
        want, got = model(x), plain(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_export_from_the_sharded_run_is_the_trained_model(run2, reference, tmp_path):
    """srlora.fsdp.unsharded(model) on every rank, export_adapter on rank 0: a plain PEFT
    adapter on the original base that computes what the single-process run computes."""
    from peft import PeftModel

    for rep in run2["reports"]:
        assert rep["unsharded_types"] == ["Parameter"] and rep["resharded_types"] == ["DTensor"]
        assert rep["export_changed"] == []
    model, controller, optimizer = w.new_run(shard=False)
    w.train_steps(model, optimizer, controller, 0, w.TOTAL_STEPS)
    plain = PeftModel.from_pretrained(w.build_base(), os.path.join(run2["out"], "adapter")).eval()
    x, _ = w.global_batch(998)
    with torch.no_grad():
        want, got = model(x), plain(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fusion_weight_is_refused_under_fsdp2_naming_virtual(run2):
    for rep in run2["reports"]:
        assert "fusion='virtual'" in rep["weight_refused"]


# ------------------------------------------------------------------ one process, world size 1
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_fsdp2_equals_the_plain_run(one_process_group):
    """fully_shard over one rank goes through every FSDP2 path (DTensor factors, sharded
    importance, the gathered switch, the optimizer's DTensor state) and must give the plain run's
    state bitwise: the same arithmetic on the same values."""
    torch.set_num_threads(1)
    steps = 7  # switches after steps 3 and 6 (total_steps 24)
    sharded = w.new_run(shard=True)
    assert isinstance(sharded[1].sharded, fsdp.ShardedSwitch)
    assert isinstance(sharded[1].importance, fsdp.ShardedImportance)
    plain = w.new_run(shard=False)
    for m, c, o in (sharded, plain):
        w.train_steps(m, o, c, 0, steps)
    a, b = w.whole_state(*sharded), w.whole_state(*plain)
    assert sharded[1].num_switches == 2
    assert [k for k in b if not _bitwise_equal(a[k], b[k])] == []
    with pytest.raises(RuntimeError, match="unsharded"):  # whole factors needed: named
        sharded[1].delta_factors(0)
    with fsdp.unsharded(sharded[0]):
        for got, want in zip(sharded[1].delta_factors(0), plain[1].delta_factors(0)):
            assert (got - want).abs().max() <= SCALE_TOL * want.abs().max()


def test_one_rank_fsdp2_bf16_base_equals_the_plain_run_bitwise(one_process_group):
    """A bf16 base model (sharded bf16 weights, bf16 side buffers; PEFT keeps the factors in
    fp32) under fully_shard over one rank: bitwise the plain run's state, through 2 switches."""
    torch.set_num_threads(1)

    def run(shard: bool):
        model, controller = srlora.wrap(w.build_base().to(torch.bfloat16), w.config())
        if shard:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
        optimizer = w.make_optimizer(model)
        controller.attach(optimizer)
        for step in range(7):
            x, y = w.global_batch(step)
            torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert controller.num_switches == 2
        return w.whole_state(model, controller, optimizer)

    a, b = run(True), run(False)
    assert (
        a["base/base_model.model.fc1"].dtype
        == a["side/base_model.model.fc1/At"].dtype
        == torch.bfloat16
    )
    assert set(a) == set(b) and [k for k in b if not _bitwise_equal(a[k], b[k])] == []


def test_switch_now_binds_a_controller_sharded_after_attach(one_process_group):
    """Sharding after attach (the manual path): the next switch binds to the shards itself."""
    model, controller = srlora.wrap(w.build_base(), w.config())
    controller.importance.updates += 1  # scores do not matter here
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    assert controller.switch_now() == 3 and controller.sharded is not None
    assert torch.equal(controller.layers[0].base_weight.full_tensor(), w.build_base().fc1.weight)


@pytest.mark.parametrize(
    "field, value",
    [("optimizer_state", "rewarm"), ("switch_schedule", "adaptive"), ("exhaustion", "refresh")],
)
def test_variants_not_served_sharded_are_refused_by_name(one_process_group, field, value):
    """The sharded switch serves the paper's method: rewarm, adaptive and refresh are refused at
    attach, naming the field, before anything is bound."""
    from dataclasses import replace
    from torch.distributed.fsdp import fully_shard

    cfg = replace(w.config(), **{field: value})
    model, controller = srlora.wrap(w.build_base(), cfg)
    fully_shard(model)
    optimizer = w.make_optimizer(model)
    with pytest.raises(srlora.UnsupportedEngineError, match=f"{field}='{value}'"):
        controller.attach(optimizer)
    assert controller.optimizer is None and controller.sharded is None


def test_wrap_of_a_sharded_model_is_refused_naming_the_order(one_process_group):
    from torch.distributed.fsdp import fully_shard

    base = w.build_base()
    fully_shard(base)
    with pytest.raises(srlora.UnsupportedEngineError, match="then fully_shard"):
        srlora.wrap(base, w.config())


def test_accelerate_launcher_fsdp2_accepted_with_virtual_fsdp1_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding_reason().startswith("FSDP2")
    srlora.wrap(w.build_base(), w.config())  # fusion="virtual": wrap before prepare is fine
    import dataclasses

    with pytest.raises(srlora.UnsupportedEngineError, match="fusion='virtual'"):
        srlora.wrap(w.build_base(), dataclasses.replace(w.config(), fusion="weight"))
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(srlora.UnsupportedEngineError, match="fsdp_version: 2"):
        srlora.wrap(w.build_base(), w.config())


def test_accelerator_state_fsdp2_accepted_with_virtual(monkeypatch):
    """An Accelerator created with an FSDP plugin of version 2 (accelerate launch --use_fsdp
    --fsdp_version 2 on GPUs): wrap with fusion="virtual" accepted, fusion="weight" and FSDP1
    refused. (accelerate 1.15 on a CPU-only machine ignores --use_fsdp and prepares DDP, which
    SRLoRA runs as DDP.)"""
    import dataclasses
    import types

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    Accelerator(cpu=True)
    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType.FSDP)
    monkeypatch.setitem(
        AcceleratorState._shared_state, "fsdp_plugin", types.SimpleNamespace(fsdp_version=2)
    )
    assert sharding_reason().startswith("FSDP2")
    srlora.wrap(w.build_base(), w.config())
    with pytest.raises(srlora.UnsupportedEngineError, match="fusion='virtual'"):
        srlora.wrap(w.build_base(), dataclasses.replace(w.config(), fusion="weight"))
    monkeypatch.setitem(
        AcceleratorState._shared_state, "fsdp_plugin", types.SimpleNamespace(fsdp_version=1)
    )
    with pytest.raises(srlora.UnsupportedEngineError, match="distributed_type=FSDP"):
        srlora.wrap(w.build_base(), w.config())


def test_deepspeed_refusal_names_fsdp2_as_the_path():
    zero3 = torch.nn.Parameter(torch.zeros(3))
    zero3.ds_id = 0
    with pytest.raises(srlora.UnsupportedEngineError, match="FSDP2 with fusion='virtual'"):
        check_engine(None, torch.optim.SGD([zero3], lr=0.1))


def test_row_ranges_follow_torch_chunk():
    for rows in range(0, 9):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world) if rows else []
            got = [fsdp.row_range(rows, world, r) for r in range(world)]
            want = [(int(c[0]), int(c[-1]) + 1) for c in chunks if len(c)]
            assert [g for g in got if g[1] > g[0]] == want
            assert sum(b - a for a, b in got) == rows


# ------------------------------------------------------------------ the documented example
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fsdp2_example_trains_checkpoints_and_exports(tmp_path):
    """The documented command: torchrun, 2 ranks, 14 steps, 6 switches; the checkpoint it saved
    from the sharded run loads into one process, and its adapter computes what that model
    computes."""
    import sys

    from peft import PeftModel

    from example_launch import run_example

    out = run_example(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            "examples/fsdp2_train.py",
            "--steps",
            "14",
            "--out",
            str(tmp_path),
        ],
        OMP_NUM_THREADS="1",
    )
    last = out.strip().splitlines()[-1]
    assert last.startswith("replicas identical:") and "on 2 ranks" in last, out[-2000:]
    assert "14 optimizer steps and 6 switches" in last
    manifest = srlora.read_manifest(tmp_path / "ckpt")
    assert manifest["step"] == 14 and manifest["num_switches"] == 6

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import fsdp2_train

    base, encode = fsdp2_train.tiny_llama()
    model, controller = srlora.wrap(base, srlora.SRLoRAConfig.from_dict(manifest["config"]))
    srlora.load_checkpoint(tmp_path / "ckpt", model=model, controller=controller)
    plain = PeftModel.from_pretrained(fsdp2_train.tiny_llama()[0], str(tmp_path / "adapter"))
    ids = encode(fsdp2_train.TEXTS[:3])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, plain.eval()(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (want - fsdp2_train.tiny_llama()[0](input_ids=ids).logits).abs().max() > 1e-3
