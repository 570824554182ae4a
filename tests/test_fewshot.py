"""Few-shot linear evaluation: the closed form against a direct least-squares solve, separable features, shot
selection and seeds, features of a model, the command's table."""
import numpy as np
import pytest

from minivit.checkpoint import save_checkpoint
from minivit.config import get_config
from minivit.data.dataset import Dataset
from minivit.fewshot import (BIAS_CONSTANT, extract_features, fewshot_eval, fewshot_fit, fewshot_predict,
                             format_table, run_fewshot, select_shots, standardize)
from minivit.model import init_params, vit_forward
from minivit.mpp import add_mpp_params
from minivit.data.checkpoint_data import normalizer_from_meta


@pytest.mark.parametrize("n,F", [(40, 6), (8, 20)])       # n >= F + 1 and n < F + 1: both normal equations
def test_solution_equals_stacked_least_squares(n, F):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, F)) * rng.uniform(0.1, 5, F) + rng.standard_normal(F)
    y = np.arange(n) % 4
    l2 = 3.0
    W, mean, std = fewshot_fit(X, y, 4, l2)
    assert W.shape == (F + 1, 4) and mean.shape == std.shape == (1, F)
    assert np.allclose(mean, X.mean(0)) and np.allclose(std, X.std(0) + 1e-5)
    Z = np.column_stack([(X - X.mean(0)) / (X.std(0) + 1e-5), np.full(n, BIAS_CONSTANT)])     # the bias column
    T = 2.0 * np.eye(4)[y] - 1.0
    A = np.vstack([Z, np.sqrt(l2) * np.eye(F + 1)])                                          # [Z; sqrt(l2) I]
    B = np.vstack([T, np.zeros((F + 1, 4))])
    W_ref = np.linalg.lstsq(A, B, rcond=None)[0]
    assert np.abs(W - W_ref).max() < 1e-10 * max(1.0, np.abs(W_ref).max())
    assert np.array_equal(standardize(X, mean, std), Z)
    assert np.array_equal(fewshot_predict(W, X, mean, std), (Z @ W_ref).argmax(1))


def separable(n_per_class, noise_seed, K=5, F=16):
    """Features around K fixed, far-apart centres (the same for every noise_seed) with small noise."""
    centres = 6.0 * np.random.default_rng(0).standard_normal((K, F))
    y = np.repeat(np.arange(K), n_per_class)
    return centres[y] + 0.3 * np.random.default_rng(noise_seed).standard_normal((len(y), F)), y


def test_separable_features_reach_100_percent():
    X, y = separable(30, noise_seed=1)
    Xt, yt = separable(70, noise_seed=2)
    table = fewshot_eval(X, y, Xt, yt, shots=(1, 5, 25), seeds=(0, 1, 2))
    assert [row["shots"] for row in table] == [1, 5, 25]
    assert all(row["accuracy"] == 1.0 and row["std"] == 0.0 and len(row["per_seed"]) == 3 for row in table)


def test_shot_selection_and_seeds():
    y = np.repeat(np.arange(4), 30)[np.random.default_rng(0).permutation(120)]
    one, five = select_shots(y, 1, 0, 4), select_shots(y, 5, 0, 4)
    assert one.shape == (4,) and five.shape == (20,)
    assert np.array_equal(np.bincount(y[five], minlength=4), [5, 5, 5, 5])
    assert set(one) <= set(five)                    # nested, as big_vision takes the first n of each permutation
    assert np.array_equal(five, select_shots(y, 5, 0, 4)) and not np.array_equal(five, select_shots(y, 5, 1, 4))
    with pytest.raises(ValueError, match="class 0 has 30"):
        select_shots(y, 31, 0, 4)
    rng = np.random.default_rng(1)
    X, Xt, yt = rng.standard_normal((120, 8)), rng.standard_normal((50, 8)), rng.integers(0, 4, 50)
    a = fewshot_eval(X, y, Xt, yt, shots=(2,), seeds=(0, 1))
    assert a == fewshot_eval(X, y, Xt, yt, shots=(2,), seeds=(0, 1))
    assert np.isclose(a[0]["std"], np.std(a[0]["per_seed"], ddof=1))
    with pytest.raises(ValueError, match="l2"):
        fewshot_fit(X, y, 4, l2=0.0)


def test_features_are_the_pooled_representation_and_ignore_mpp_params(tmp_path):
    cfg = get_config("test")
    params = add_mpp_params(init_params(cfg, seed=3), cfg)
    images = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    norm = normalizer_from_meta({})
    feats = extract_features(params, cfg, images, norm, batch_size=3)
    _, cache = vit_forward(params, norm(images), cfg)
    assert feats.shape == (7, cfg.width) and feats.dtype == np.float64
    assert np.allclose(feats, cache["pooled"], atol=1e-6)

    x = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    ds = Dataset("tiny", x, np.arange(40) % 5, x[:15], np.arange(15) % 5, classes=list("abcde"))
    save_checkpoint(tmp_path / "m.npz", params, cfg, meta={"task": "mpp", "data": {"normalize": "minus_one_one"}})
    table = run_fewshot(tmp_path / "m.npz", shots=(1, 5), seeds=2, data=ds)
    assert [r["shots"] for r in table] == [1, 5]
    # the checkpoint's own normalization and the plain ViT's features, probed: the table of those features
    minus_one_one = normalizer_from_meta({"normalize": "minus_one_one"})
    want = fewshot_eval(extract_features(params, cfg, x, minus_one_one), ds.train_labels,
                        extract_features(params, cfg, x[:15], minus_one_one), ds.test_labels, shots=(1, 5),
                        seeds=(0, 1))
    assert [r["per_seed"] for r in table] == [r["per_seed"] for r in want]
    text = format_table(table, "title")
    assert text.splitlines()[0] == "title" and len(text.splitlines()) == 4
