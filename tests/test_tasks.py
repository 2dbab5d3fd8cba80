"""The seeded, de-duplicated split and the dataset loaders of srlora compare."""

import json

import numpy as np
import pytest

from srlora_lab.experiments import tasks
from srlora_lab.experiments.report import mean_ci, smooth, steps_to, t975
from srlora_lab.experiments.runner import batch_order, lr_factor


def _data(n=300, dup_every=7, seed=0):
    rng = np.random.default_rng(seed)
    xs = [f"example {i} {' '.join(rng.choice(list('abcdefgh'), 4))}" for i in range(n)]
    ys = rng.integers(0, 3, n)
    xs = xs + [xs[i] for i in range(0, n, dup_every)]  # exact duplicates, same label
    xs = xs + ["  example 5   " + xs[5][len("example 5 ") :]]  # whitespace variant of #5
    ys = np.concatenate([ys, ys[::dup_every], [ys[5]]])
    return tasks.Dataset("text", xs, ys, ["a", "b", "c"], "synthetic")


def test_split_has_no_test_example_in_train_or_val():
    d = _data()
    sp = tasks.split(d, seed=3)
    key = lambda i: " ".join(d.x[i].split())
    test = {key(i) for i in sp.test}
    assert not test & {key(i) for i in sp.train}
    assert not test & {key(i) for i in sp.val}
    assert not {key(i) for i in sp.val} & {key(i) for i in sp.train}
    assert sp.info["duplicates_dropped"] == len(d) - 300
    assert len(sp.train) + len(sp.val) + len(sp.test) == 300


def test_split_drops_texts_with_conflicting_labels():
    d = tasks.Dataset("text", ["x", "y", "x", "z", "w"], np.array([0, 1, 1, 0, 1]), ["0", "1"], "t")
    assert tasks.dedup_indices(d.x, d.y) == [1, 3, 4]


def test_split_is_seeded_and_limits_keep_prefixes():
    d = _data()
    a, b, c = tasks.split(d, seed=1), tasks.split(d, seed=1), tasks.split(d, seed=2)
    assert np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.test, c.test)
    small = tasks.split(d, seed=1, max_train=50, max_test=20, max_val=5)
    assert np.array_equal(small.test, a.test[:20]) and np.array_equal(small.train, a.train[:50])
    assert small.info["test_fingerprint"] != a.info["test_fingerprint"]


def test_load_table_csv_jsonl_and_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nnice film,pos\nawful film,neg\nok,pos\n")
    d = tasks.load_table(str(p))
    assert d.label_names == ["neg", "pos"] and d.y.tolist() == [1, 0, 1]
    j = tmp_path / "d.jsonl"
    j.write_text(
        "\n".join(json.dumps({"text": t, "label": l}) for t, l in [("a", 2), ("b", 0), ("c", 2)])
    )
    assert tasks.load_table(str(j)).y.tolist() == [1, 0, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nx,1\ny,0\n")
    with pytest.raises(tasks.DataError, match="missing column.*'text'"):
        tasks.load_table(str(bad))
    one = tmp_path / "one.csv"
    one.write_text("text,label\nx,1\ny,1\n")
    with pytest.raises(tasks.DataError, match="at least 2 distinct labels"):
        tasks.load_table(str(one))
    with pytest.raises(tasks.DataError, match="no such file"):
        tasks.load_table(str(tmp_path / "nope.csv"))


def test_batch_order_same_for_all_methods_and_covers_epochs():
    o1, o2 = batch_order(10, 7, 4, seed=5), batch_order(10, 7, 4, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(o1, o2))
    flat = np.concatenate(o1)
    assert sorted(flat[:10].tolist()) == list(range(10))  # first epoch is a permutation
    assert not all(np.array_equal(a, b) for a, b in zip(o1, batch_order(10, 7, 4, seed=6)))


def test_lr_schedule():
    f = [lr_factor(s, 100, 0.1, "constant") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[99] == 1.0
    g = [lr_factor(s, 100, 0.1, "linear") for s in range(100)]
    assert g[9] == 1.0 and g[10] == 1.0 and g[99] == pytest.approx(1 / 90)
    assert lr_factor(0, 5, 0.0, "constant") == 1.0


def test_stats():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-4)
    assert np.isnan(mean_ci([1.0])[1])
    assert t975(1) == 12.706 and abs(t975(60) - 2.000) < 0.002
    assert smooth([4, 2, 0, 2], 2).tolist() == [4, 3, 1, 1]
    assert steps_to([4, 2, 0, 2], 1.0, 2) == 3 and steps_to([4, 4], 1.0, 1) is None


def test_rt_polarity_is_deduplicated_and_balanced_enough():
    d = tasks.load_rt_polarity()
    assert len(d) == 12808 and d.label_names == ["rotten", "fresh"]
    sp = tasks.split(d, 0)
    assert sp.info["duplicates_dropped"] > 0
    train = {" ".join(d.x[i].split()) for i in sp.train}
    assert not any(" ".join(d.x[i].split()) in train for i in sp.test)


def test_bbc_labels_are_sorted_folders():
    d = tasks.load_bbc_news()
    assert d.label_names == sorted(d.label_names) and len(d) == 2225
    assert np.bincount(d.y).min() > 300
