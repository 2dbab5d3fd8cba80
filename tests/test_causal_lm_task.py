"""The causal-LM path (task bbc-lm): a tiny random Llama through the same runner and CLI, and
(slow) the real SmolLM2-135M for a few steps."""

import json
import math

import numpy as np
import pytest
import torch

from srlora_lab.cli import main
from srlora_lab.experiments import diagnostics_plots, runner, tasks
from srlora_lab.experiments.models import LM_TARGETS, Bundle, LMEncoded, ModelError, load_model

WORDS = [
    "the",
    "bank",
    "rate",
    "rose",
    "fell",
    "minister",
    "said",
    "club",
    "won",
    "match",
    "film",
    "music",
    "shares",
    "game",
    "new",
    "year",
    "labour",
    "government",
    "market",
    "players",
]


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS (unknown words -> [UNK]) with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )


def tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def synthetic_docs(n=60, seed=0):
    """Documents of a few repeated word patterns: a model can learn them quickly."""
    rng = np.random.default_rng(seed)
    pats = [WORDS[i : i + 5] for i in range(0, 20, 5)]
    docs = [
        " ".join(w for _ in range(int(rng.integers(3, 9))) for w in pats[int(rng.integers(4))])
        for _ in range(n)
    ]
    return tasks.Dataset("lm", docs, np.zeros(n, dtype=np.int64), ["doc"], "synthetic")


def tiny_bundle():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    for p in model.parameters():
        p.requires_grad_(False)
    return Bundle("tiny-llama", "lm", model, [], list(LM_TARGETS), tok)


def test_blocks_stay_inside_documents_and_padding_is_masked():
    tok = tiny_tokenizer()
    docs = ["the bank rate rose", "club won " * 7 + "match", "film"]
    enc = LMEncoded(tok, docs, block_len=6)
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    for d, seq in enumerate(ids):  # each document's blocks, joined, are the document + EOS
        joined = [t for b in enc.blocks_of([d]) for t in enc.blocks[b]]
        assert joined == list(seq) + [eos]
        assert all(len(enc.blocks[b]) <= 6 for b in enc.blocks_of([d]))
    assert list(enc.blocks_of([2, 0])) == list(enc.blocks_of([2])) + list(enc.blocks_of([0]))
    inputs, labels = enc.batch(enc.blocks_of([0, 2]))
    assert inputs["input_ids"].shape == labels.shape == (2, 5)
    assert (labels[1, 2:] == -100).all() and (inputs["attention_mask"][1, 2:] == 0).all()
    assert (
        labels[inputs["attention_mask"] == 1] == inputs["input_ids"][inputs["attention_mask"] == 1]
    ).all()


def test_lm_loss_is_the_mean_next_token_cross_entropy():
    """loss_sums against the model's own causal-LM loss (HF shifts labels the same way)."""
    b = tiny_bundle()
    enc = LMEncoded(b.tokenizer, synthetic_docs(4).x, block_len=12)
    inputs, labels = enc.batch(np.arange(len(enc.blocks))[:4])
    loss_sum, correct, n = runner.loss_sums(b, b.base, inputs, labels)
    hf = b.base(**inputs, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    assert float(loss_sum / n) == pytest.approx(float(hf), rel=1e-5)
    assert 0 <= correct <= n


@pytest.mark.parametrize("method", ["lora", "srlora"])
def test_runner_lm_path_on_a_tiny_llama(method):
    """The runner's LM path: blocks of held-out documents, loss falls, perplexity = exp(loss)."""
    b = tiny_bundle()
    data = synthetic_docs()
    sp = tasks.split(data, 0)
    enc = b.encode(data, max_len=16)
    rec = runner.run_one(
        b,
        enc,
        sp,
        method=method,
        seed=0,
        lr=1e-2,
        steps=24,
        batch_size=8,
        r=4,
        lora_alpha=8,
        r_target=12,
        eval_every=12,
        eval_size=16,
        progress=False,
    )
    assert rec["adapted_modules"] == 2 * 7  # q,k,v,o,gate,up,down in 2 layers
    assert len(rec["train_loss"]) == 24 and all(map(math.isfinite, rec["train_loss"]))
    assert np.mean(rec["train_loss"][-4:]) < np.mean(rec["train_loss"][:4])
    assert rec["final_perplexity"] == pytest.approx(math.exp(rec["final_test_loss"]))
    assert rec["val_perplexity"] == pytest.approx(math.exp(rec["val_loss"]))
    assert 0 <= rec["final_accuracy"] <= 1
    assert rec["test_blocks"] == len(enc.blocks_of(sp.test))
    train_docs = {data.x[i] for i in sp.train}
    assert not any(data.x[i] in train_docs for i in sp.test)
    d = rec["diagnostics"]
    assert len(d["spectra"]) == 14 and d["summary"]["erank_mean"] > 0
    if method == "srlora":  # r'=2, (12-4)//2 = 4 switches
        assert rec["num_switches"] == 4 and len(d["pairs"]) == 14 * 4 * 2
    else:
        assert d["pairs"] == [] and all(s["energy99"] <= 4 for s in d["spectra"])


def test_lm_task_refuses_a_classifier_model():
    with pytest.raises(ModelError, match="not a causal language model"):
        load_model("minilm", "lm", 1)
    with pytest.raises(ModelError, match="not a causal language model"):
        load_model("efficientnet-lite0", "lm", 1)


def test_compare_cli_bbc_lm_with_a_tiny_llama_writes_diagnostics_png(tmp_path, capsys):
    """`srlora compare --task bbc-lm` on the real BBC articles with a tiny saved Llama."""
    model_dir = tmp_path / "tiny-llama"
    tok = tiny_tokenizer()
    tok.save_pretrained(model_dir)
    tiny_llama(len(tok)).save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--task",
            "bbc-lm",
            "--model",
            str(model_dir),
            "--methods",
            "lora,srlora",
            "--steps",
            "8",
            "--batch-size",
            "4",
            "--max-len",
            "32",
            "--r",
            "4",
            "--r-target",
            "12",
            "--seeds",
            "0",
            "--max-train",
            "20",
            "--max-val",
            "4",
            "--max-test",
            "4",
            "--eval-every",
            "4",
            "--eval-size",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["kind"] == "lm" and res["model"]["trained_head"] == []
    assert res["model"]["target_modules"] == LM_TARGETS
    assert {r["method"] for r in res["runs"]} == {"lora", "srlora"}
    for r in res["runs"]:
        assert math.isfinite(r["final_perplexity"]) and r["diagnostics"]["spectra"]
    assert (out / "diagnostics.png").stat().st_size > 5000
    assert "diagnostics.png" in capsys.readouterr().out
    assert diagnostics_plots.write({"runs": [], "config": {}}, str(tmp_path)) == []


@pytest.mark.slow
def test_smollm2_bbc_lm_a_few_steps():
    """The real SmolLM2-135M (GGUF, offline) on BBC article blocks: LoRA on all 7 projections
    of its 30 layers, 4 steps; loss finite and lower after the steps, perplexity recorded."""
    data = tasks.TASKS["bbc-lm"].loader()
    sp = tasks.split(data, 0, max_train=8, max_val=2, max_test=2)
    b = load_model("smollm2", "lm", 1)
    enc = b.encode(data, max_len=32)
    rec = runner.run_one(
        b,
        enc,
        sp,
        method="srlora",
        seed=0,
        lr=1e-3,
        steps=4,
        batch_size=2,
        r=4,
        lora_alpha=8,
        r_target=8,
        eval_every=4,
        eval_size=4,
        eval_val=False,
        progress=False,
    )
    assert rec["adapted_modules"] == 30 * 7
    assert all(map(math.isfinite, rec["train_loss"]))
    assert math.isfinite(rec["final_perplexity"]) and 1 < rec["final_perplexity"] < 1e4
    assert rec["num_switches"] == 2 and len(rec["diagnostics"]["pairs"]) == 210 * 2 * 2
