"""Masked patch prediction: the corruption, the colour targets, the whole-model gradient check, the training task,
checkpoints and fine-tuning from them."""
import numpy as np
import pytest

from minivit.backend import to_device, to_numpy
from minivit.checkpoint import load_checkpoint
from minivit.config import get_config
from minivit.data.dataset import Dataset
from minivit.finetune import prepare_finetune
from minivit.gradcheck import gradcheck
from minivit.model import init_params
from minivit.mpp import (KEEP, MASK, RANDOM, Corruption, add_mpp_params, corrupt_forward, draw_corruption,
                         mean_colour_classes, mpp_backward, mpp_forward, mpp_loss_backward, mpp_loss_forward,
                         mpp_targets, num_colour_classes, strip_mpp)
from minivit.data.checkpoint_data import normalizer_from_meta
from minivit.recipes import run_pretrain_mpp
from minivit.tasks import MPPTask
from minivit.train import TrainConfig, train
from minivit.tree import flatten, same_structure, unflatten

# Three images of the "test" config's 4 patches, 2 corrupted each: every kind of corruption, a random replacement
# whose source is itself [mask]ed (image 2) and one whose source is kept (image 1).
FIXED = Corruption(index=np.array([[0, 2], [1, 3], [0, 1]]),
                   kind=np.array([[MASK, RANDOM], [KEEP, RANDOM], [MASK, RANDOM]], dtype=np.int8),
                   source=np.array([[0, 3], [1, 1], [0, 0]]))


def test_draw_corruption_counts_sources_and_rates():
    rng = np.random.default_rng(0)
    c = draw_corruption(4000, 64, rng)
    assert c.index.shape == c.kind.shape == c.source.shape == (4000, 32)      # exactly 50 % of every image
    assert all(len(set(row)) == 32 for row in c.index[:50]) and (np.diff(c.index, axis=1) > 0).all()
    rand = c.kind == RANDOM
    assert (c.source[rand] != c.index[rand]).all() and (c.source[~rand] == c.index[~rand]).all()
    assert c.source.min() >= 0 and c.source.max() < 64
    rates = [np.mean(c.kind == k) for k in (MASK, RANDOM, KEEP)]
    assert np.allclose(rates, (0.8, 0.1, 0.1), atol=0.005)
    # random sources are uniform over the other patches: offsets (source - index) mod Np cover 1..63 evenly
    offsets = np.bincount(((c.source - c.index) % 64)[rand], minlength=64)
    assert offsets[0] == 0 and offsets[1:].min() > 0.7 * offsets[1:].mean()
    again = draw_corruption(4000, 64, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(c, again))
    c = draw_corruption(2, 10, rng, mask_rate=0.3, replace_rates=(0.0, 1.0, 0.0))
    assert c.index.shape == (2, 3) and (c.kind == RANDOM).all()


@pytest.mark.parametrize("kw", [dict(mask_rate=0.0), dict(mask_rate=1.5), dict(replace_rates=(0.8, 0.1)),
                                dict(replace_rates=(0.8, 0.3, -0.1)), dict(replace_rates=(0.5, 0.1, 0.1))])
def test_bad_rates_raise(kw):
    with pytest.raises(ValueError, match="rate"):
        draw_corruption(2, 16, np.random.default_rng(0), **kw)


def test_corrupt_forward_places_mask_source_and_kept_patches():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5))
    token = rng.standard_normal((1, 1, 5))
    y, _ = corrupt_forward(x, token, FIXED)
    assert np.array_equal(y[0, 0], token[0, 0]) and np.array_equal(y[0, 2], x[0, 3])
    assert np.array_equal(y[1, 1], x[1, 1]) and np.array_equal(y[1, 3], x[1, 1])
    assert np.array_equal(y[2, 0], token[0, 0]) and np.array_equal(y[2, 1], x[2, 0])   # the clean source
    for b, i in [(0, 1), (0, 3), (1, 0), (1, 2), (2, 2), (2, 3)]:                      # not corrupted
        assert np.array_equal(y[b, i], x[b, i])


def test_mean_colour_classes_by_hand():
    img = np.zeros((1, 8, 8, 3))
    img[:, :4, :4] = -1.0                         # patch 0: black -> (0, 0, 0) -> 0
    img[:, :4, 4:] = 1.0                          # patch 1: white -> (7, 7, 7) -> 511
    img[:, 4:, :4] = [1.0, -1.0, 0.0]             # patch 2: (7, 0, 4) -> 7*64 + 0 + 4 = 452
    img[:, 4:, 4:, :] = -1.0
    img[:, 4:6, 4:, 0] = 1.0                      # patch 3: red mean 0 -> level 4; g, b black -> 4*64 = 256
    assert mean_colour_classes(img, 4).tolist() == [[0, 511, 452, 256]]
    gray = np.linspace(-1, 1, 8 * 16).reshape(1, 8, 16, 1)
    classes = mean_colour_classes(gray, 4)
    assert classes.shape == (1, 8) and classes.max() < num_colour_classes(1) == 8
    assert num_colour_classes(3) == 512
    assert mpp_targets(img, 4, Corruption(np.array([[1, 2]]), np.zeros((1, 2), np.int8),
                                          np.array([[1, 2]]))).tolist() == [511, 452]


def _mpp_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    params = add_mpp_params(init_params(cfg, seed=seed, dtype=np.float64), cfg, seed)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in flatten(params).items()}
    H, W = cfg.image_hw
    images = rng.uniform(-1, 1, (3, H, W, cfg.channels))
    return {"images": images, **params}


@pytest.mark.parametrize("name,overrides,train", [
    ("token", {}, False),
    ("gap, dropout and stochastic depth", {"pooling": "gap", "dropout": 0.1, "drop_path": 0.2}, True),
])
def test_mpp_gradcheck_whole_model(name, overrides, train):
    """Every parameter (mask_token and mpp_head included) and the images, float64, fixed corruption and masks."""
    cfg = get_config("test", **overrides)
    inputs = _mpp_inputs(cfg)
    targets = mpp_targets(inputs["images"], cfg.patch_size, FIXED)

    def run(inp):
        params = unflatten({k: v for k, v in inp.items() if k != "images"})
        rng = np.random.default_rng(7) if train else None
        return mpp_loss_forward(params, inp["images"], cfg, FIXED, targets, train=train, rng=rng)

    def backward(inp, dy):
        dimages, grads = mpp_loss_backward(run(inp)[2], dy)
        return {**flatten(grads), "images": dimages}

    results = gradcheck(lambda inp: run(inp)[0], backward, inputs, max_coords=24)
    assert [r.name for r in results] == list(inputs)
    bad = [(r.name, r.rel_error) for r in results if r.rel_error > 1e-6]
    assert not bad, bad


def test_grads_mirror_params_with_a_zero_classifier_head():
    cfg = get_config("test", representation_size=6)
    params = add_mpp_params(init_params(cfg, dtype=np.float64), cfg)
    rng = np.random.default_rng(0)
    params["mpp_head"]["w"] = rng.standard_normal((12, 512))     # a zero head would stop every gradient below it
    images = rng.uniform(-1, 1, (3, 8, 8, 3))
    logits, cache = mpp_forward(params, images, cfg, FIXED)
    assert logits.shape == (6, 512)
    dimages, grads = mpp_backward(rng.standard_normal(logits.shape), cache)
    assert dimages.shape == images.shape
    assert same_structure(grads, params)                           # (the optimizer pairs them by name)
    for k in ("head", "pre_logits"):
        assert not grads[k]["w"].any() and not grads[k]["b"].any()
    assert np.abs(grads["mask_token"]).min() > 0 and np.abs(grads["mpp_head"]["w"]).min() > 0   # not vacuous
    # only the masked positions feed the mask token: no [mask] -> zero gradient
    none_masked = FIXED._replace(kind=np.full((3, 2), KEEP, np.int8), source=FIXED.index)
    _, cache = mpp_forward(params, images, cfg, none_masked)
    assert not mpp_backward(rng.standard_normal(logits.shape), cache)[1]["mask_token"].any()


def tiny_data(n=48, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 4
    return Dataset("tiny", x, y, x[:16].copy(), y[:16].copy(), classes=[f"c{i}" for i in range(4)])


def mpp_config(tmp_path, **kw):
    base = dict(dataset="tiny", model="test", epochs=4, batch_size=16, lr=3e-3, weight_decay=0.05,
                label_smoothing=0.0, augment="none", out=str(tmp_path / "mpp"), warmup_steps=1,
                model_overrides={"dropout": 0.1})
    base.update(kw)
    return TrainConfig(**base)


def test_pretrain_checkpoint_resume_and_finetune(tmp_path):
    full = run_pretrain_mpp(mpp_config(tmp_path / "a"), data=tiny_data(), progress=False, log=None)
    assert full.steps == 12
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]
    params, cfg, meta = load_checkpoint(full.run_dir / "last.npz")
    ev = MPPTask().evaluate(params, cfg, tiny_data().test_images, None, normalizer_from_meta(meta["data"]))
    assert ev["patches"] == 16 * 2 and ev["accuracy"] == full.test_accuracy   # the final weights', 2 of 4 patches
    assert meta["task"] == "mpp" and meta["mpp"] == {"mask_rate": 0.5, "replace_rates": [0.8, 0.1, 0.1], "bits": 3}
    assert set(meta["extra_params"]) == {"mask_token", "mpp_head"} and params["mpp_head"]["w"].shape == (12, 512)
    assert params["mpp_head"]["w"].any() and not params["head"]["w"].any()   # the classifier head never moved

    part = run_pretrain_mpp(mpp_config(tmp_path / "b", max_steps=5), data=tiny_data(), progress=False, log=None)
    resumed = run_pretrain_mpp(None, resume=part.run_dir, data=tiny_data(), progress=False, log=None)
    assert resumed.steps == 12
    a, b = flatten(full.params), flatten(resumed.params)
    assert all(np.array_equal(to_numpy(a[k]), to_numpy(b[k])) for k in a)

    ft_params, ft_cfg = prepare_finetune(params, cfg)                   # drops the MPP parameters, zero head
    assert set(ft_params) == set(strip_mpp(params)) and not ft_params["head"]["w"].any()
    tc = mpp_config(tmp_path / "c", epochs=2, out=str(tmp_path / "ft"))
    result = train(tc, params=ft_params, cfg=ft_cfg, data=tiny_data(), progress=False, log=None)
    assert result.steps == 6 and load_checkpoint(result.run_dir / "last.npz")[2]["task"] == "classification"


def test_mpp_task_rejects_other_normalization(tmp_path):
    with pytest.raises(ValueError, match="minus_one_one"):
        run_pretrain_mpp(mpp_config(tmp_path, normalize="mean_std", epochs=1), data=tiny_data(), progress=False,
                         log=None)
    with pytest.raises(ValueError, match="bits"):
        MPPTask(bits=0)


def test_gpu_matches_cpu(device):
    if device == "cpu":
        pytest.skip("compares the GPU with the CPU")
    cfg = get_config("test")
    inputs = _mpp_inputs(cfg)
    params = unflatten({k: v for k, v in inputs.items() if k != "images"})
    out = []
    for dev in ("cpu", "gpu"):
        logits, cache = mpp_forward(to_device(params, dev), to_device(inputs["images"], dev), cfg, FIXED)
        dimages, grads = mpp_backward(logits * 0 + 1, cache)
        out.append((to_numpy(logits), to_numpy(dimages), to_numpy(grads["mask_token"])))
    for a, b in zip(*out):
        assert np.allclose(a, b, rtol=1e-9, atol=1e-12)
