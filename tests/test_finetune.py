"""Fine-tuning mechanics: resizing a model, the fresh head, training through a resize, bad input."""
import numpy as np
import pytest

from minivit.config import get_config
from minivit.finetune import new_head, prepare_finetune, resampled_backward, resampled_forward, resize_model
from minivit.gradcheck import gradcheck
from minivit.model import init_params, vit_forward
from minivit.tree import flatten, unflatten


def test_resize_model_grows_the_grid_and_keeps_the_rest():
    cfg = get_config("test", image_size=8, patch_size=4)            # grid 2x2
    params = init_params(cfg, seed=0)
    params["pos_embed"] += np.random.default_rng(0).standard_normal(params["pos_embed"].shape).astype(np.float32)
    p2, cfg2 = resize_model(params, cfg, 16)                        # grid 4x4
    assert cfg2.grid == (4, 4) and p2["pos_embed"].shape == (1, 17, cfg.width)
    np.testing.assert_array_equal(p2["pos_embed"][0, 0], params["pos_embed"][0, 0])   # class token kept
    grid = params["pos_embed"][0, 1:].reshape(2, 2, -1)
    new = p2["pos_embed"][0, 1:].reshape(4, 4, -1)
    np.testing.assert_allclose(new[0, 0], grid[0, 0], rtol=1e-6)   # corners land on corners (linear)
    np.testing.assert_allclose(new[3, 3], grid[1, 1], rtol=1e-6)
    assert p2["blocks"] is params["blocks"]                         # everything else shared, untouched
    x = np.zeros((1, 16, 16, 3), np.float32)
    logits, _ = vit_forward(p2, x, cfg2)
    assert logits.shape == (1, cfg.num_classes)


def test_no_resampling_reinitializes_the_grid():
    cfg = get_config("test")
    params = init_params(cfg, seed=0)
    p2, cfg2 = resize_model(params, cfg, 12, method="none")
    assert p2["pos_embed"].shape == (1, 10, cfg.width)
    np.testing.assert_array_equal(p2["pos_embed"][0, 0], params["pos_embed"][0, 0])
    assert 0.01 < float(p2["pos_embed"][0, 1:].std()) < 0.03


def test_new_head_is_zero_and_drops_pre_logits():
    cfg = get_config("test", representation_size=6)
    params = init_params(cfg, seed=0)
    p2, cfg2 = new_head(params, cfg, 9)
    assert cfg2.num_classes == 9 and cfg2.representation_size == 0 and "pre_logits" not in p2
    assert p2["head"]["w"].shape == (cfg.width, 9) and not p2["head"]["w"].any() and not p2["head"]["b"].any()
    p3, cfg3 = prepare_finetune(params, cfg, 12, num_classes=cfg.num_classes)   # same classes: head kept
    assert p3["head"] is params["head"] and cfg3.image_size == 12


def test_training_through_a_resize_gradcheck():
    cfg = get_config("test", image_size=8)                          # stored at grid 2x2, run at 12x12 (3x3)
    rng = np.random.default_rng(0)
    flat = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in flatten(init_params(cfg, dtype=np.float64)).items()}
    inp = dict(flat, images=rng.standard_normal((2, 12, 12, 3)))
    for method in ("linear", "bicubic"):
        def run(i):
            p = unflatten({k: v for k, v in i.items() if k != "images"})
            return resampled_forward(p, i["images"], cfg, 12, method)
        def bwd(i, dy):
            dimages, grads = resampled_backward(dy, run(i)[1])
            assert grads["pos_embed"].shape == (1, 5, cfg.width)    # the stored grid's gradient
            return dict(flatten(grads), images=dimages)
        for r in gradcheck(lambda i: run(i)[0], bwd, inp, max_coords=16):
            assert r.rel_error <= 1e-6, (method, r.name, r.rel_error)


def test_bad_fine_tuning_input():
    cfg = get_config("test")
    params = init_params(cfg)
    with pytest.raises(ValueError, match="image size 10 is not divisible by patch size 4"):
        resize_model(params, cfg, 10)
    with pytest.raises(ValueError, match="resample method must be one of"):
        resize_model(params, cfg, 12, method="nearest")
