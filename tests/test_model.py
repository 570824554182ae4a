"""The whole ViT: gradient checks on the test config, pinned parameter counts, dtypes, initialization, bad input."""
import math

import numpy as np
import pytest

from minivit.config import CONFIGS, ViTConfig, count_params, get_config, param_shapes
from minivit.gradcheck import gradcheck_model
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.inference import predict
from minivit.model import attention_probs, check_params, init_params, vit_backward, vit_forward
from minivit.tree import flatten, num_params, same_structure, unflatten

from conftest import requires_gpu, CUPY


# the variants whose GPU path differs from the others' (fused tanh GELU, dropout masks moved to the device, GAP)
STANDIN_CASES = [({}, False), ({"pooling": "gap"}, False),
                 ({"dropout": 0.1, "attn_dropout": 0.2, "drop_path": 0.3}, True)]


@pytest.mark.parametrize("overrides,train", [
    ({}, False),
    ({"pooling": "gap"}, False),
    ({"gelu": "exact"}, False),
    ({"gelu": "exact", "pooling": "gap"}, False),
    ({"representation_size": 7}, False),
    ({"dropout": 0.1, "attn_dropout": 0.2, "drop_path": 0.3}, False),   # dropout off (evaluation)
    ({"dropout": 0.1, "attn_dropout": 0.2, "drop_path": 0.3}, True),    # dropout on, fixed mask
    ({"dropout": 0.1, "attn_dropout": 0.2, "pooling": "gap"}, True),
    ({"image_size": (8, 12)}, False),                                    # non-square image
])
def test_whole_model_gradcheck(device, overrides, train, request):
    if request.node.callspec.params["device"] == "gpu-standin" and (overrides, train) not in STANDIN_CASES:
        pytest.skip("no GPU-only line in this variant (the stand-in is slow; CPU and GPU runs check it)")
    cfg = get_config("test", **overrides)
    results = gradcheck_model(cfg, train=train, device=device)
    names = [r.name for r in results]
    assert names[0] == "images" and names[1:] == list(flatten(param_shapes(cfg), is_leaf=lambda v: isinstance(v, tuple)))
    worst = max(results, key=lambda r: r.rel_error)
    assert worst.rel_error <= 1e-6, f"{worst.name}: {worst.rel_error:.2e}"


def test_grads_mirror_params_and_dx_shape():
    cfg = get_config("test", representation_size=4)
    params = init_params(cfg, seed=1, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3))
    logits, cache = vit_forward(params, x, cfg)
    dx, grads = vit_backward(np.ones_like(logits), cache)
    assert dx.shape == x.shape
    assert same_structure(grads, params)


PINNED = {  # the original code's tests (1000 classes, 224x224)
    "vit-ti16": 5_717_416, "vit-s16": 22_050_664, "vit-s32": 22_878_952, "vit-b8": 86_576_872,
    "vit-b16": 86_567_656, "vit-b32": 88_224_232, "vit-l16": 304_326_632, "vit-l32": 306_535_400,
    "vit-h14": 632_045_800,
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_parameter_counts_match_original_code(name):
    assert count_params(CONFIGS[name]) == PINNED[name]


def test_gap_model_has_no_class_token():
    cfg = get_config("vit-b16", pooling="gap")
    assert count_params(cfg) == 86_566_120
    assert "cls_token" not in param_shapes(cfg)
    assert param_shapes(cfg)["pos_embed"] == (1, 196, 768)


def test_param_count_of_allocated_model_matches_shapes():
    cfg = get_config("cifar-small")
    assert num_params(init_params(cfg)) == count_params(cfg)


def test_float32_stays_float32_end_to_end():
    cfg = get_config("test", dropout=0.1, attn_dropout=0.1, drop_path=0.1, gelu="exact")
    params = init_params(cfg, seed=0)
    params = unflatten({k: v + np.float32(0.1) for k, v in flatten(params).items()})
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    logits, cache = vit_forward(params, x, cfg, train=True, rng=np.random.default_rng(0))
    loss, ce = cross_entropy_forward(logits, np.array([0, 3]), smoothing=0.1)
    dx, grads = vit_backward(cross_entropy_backward(1.0, ce), cache)

    def walk(obj, where):   # every array anywhere in the caches is float32 (or a bool/int mask)
        if hasattr(obj, "dtype"):
            assert obj.dtype in (np.float32, np.bool_), f"{where} is {obj.dtype}"
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")
    walk(cache, "cache")
    assert logits.dtype == loss.dtype == dx.dtype == np.float32
    for k, g in flatten(grads).items():
        assert g.dtype == np.float32, k


def test_initialization_follows_the_original_code():
    cfg = get_config("vit-ti16", num_classes=10)
    p = init_params(cfg, seed=0)
    D, M = cfg.width, cfg.mlp_dim
    assert not p["cls_token"].any() and not p["head"]["w"].any() and not p["head"]["b"].any()
    assert abs(p["pos_embed"].std() - 0.02) < 0.001
    for blk in p["blocks"]:
        q = blk["attn"]["qkv_w"][:, :D]                      # each of q, k, v over its own (D, D) fan
        assert np.abs(q).max() <= math.sqrt(6 / (2 * D)) and np.abs(q).max() > 0.95 * math.sqrt(6 / (2 * D))
        assert np.abs(blk["mlp"]["fc1_w"]).max() <= math.sqrt(6 / (D + M))
        assert 0 < np.abs(blk["mlp"]["fc1_b"]).max() < 1e-5  # normal(1e-6)
        assert not blk["attn"]["qkv_b"].any() and (blk["norm1"]["w"] == 1).all()
    w = p["patch_embed"]["w"]                                 # lecun normal over fan-in P*P*C = 768
    assert abs(w.std() - math.sqrt(1 / 768)) < 0.05 * math.sqrt(1 / 768)
    assert np.abs(w).max() <= 2 * math.sqrt(1 / 768) / 0.87962566103423978 + 1e-6   # truncated at 2 std
    again = init_params(cfg, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(flatten(p).values(), flatten(again).values()))


def test_attention_probs_are_reachable_and_normalized():
    cfg = get_config("test")
    params = init_params(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    _, cache = vit_forward(params, x, cfg)
    probs = attention_probs(cache)
    assert len(probs) == cfg.depth and probs[0].shape == (2, cfg.heads, cfg.seq_len, cfg.seq_len)
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, rtol=1e-5)
    prob = predict(params, cfg, x)
    assert prob.shape == (2, cfg.num_classes)
    np.testing.assert_allclose(prob, 1.0 / cfg.num_classes, rtol=1e-6)   # zero head: uniform


def test_inference_forward_without_cache_gives_the_same_outputs():
    cfg = get_config("test")
    params = init_params(cfg, seed=1, dtype=np.float64)
    params["head"]["w"] = np.random.default_rng(0).standard_normal(params["head"]["w"].shape)
    x = np.random.default_rng(2).standard_normal((3, *cfg.image_hw, cfg.channels))
    logits, cache = vit_forward(params, x, cfg)
    logits_nc, cache_nc = vit_forward(params, x, cfg, keep_cache=False)
    np.testing.assert_array_equal(logits_nc, logits)
    np.testing.assert_array_equal(cache_nc["pooled"], cache["pooled"])
    assert cache_nc["blocks"] is None and len(cache["blocks"]) == cfg.depth
    with pytest.raises(ValueError, match="keep_cache=False"):
        vit_backward(np.ones_like(logits), cache_nc)
    with pytest.raises(ValueError, match="keep_cache=False"):
        attention_probs(cache_nc)


def test_backward_releases_the_blocks_activations():
    cfg = get_config("test")
    params = init_params(cfg, seed=1, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((2, *cfg.image_hw, cfg.channels))
    logits, cache = vit_forward(params, x, cfg)
    _, grads = vit_backward(np.ones_like(logits), cache)
    _, again = vit_backward(np.ones_like(logits), vit_forward(params, x, cfg)[1])    # a fresh forward: same grads
    np.testing.assert_array_equal(grads["blocks"][0]["attn"]["qkv_w"], again["blocks"][0]["attn"]["qkv_w"])
    assert cache["blocks"] == [None] * cfg.depth                                    # released, block by block
    with pytest.raises(ValueError, match="backward pass already"):
        vit_backward(np.ones_like(logits), cache)
    with pytest.raises(ValueError, match="released the attention probabilities"):
        attention_probs(cache)


def test_bad_input_errors_name_the_problem():
    cfg = get_config("test")
    params = init_params(cfg)
    ok = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="rank 4"):
        vit_forward(params, ok[0], cfg)
    with pytest.raises(ValueError, match="3 channel"):
        vit_forward(params, np.zeros((2, 8, 8, 1), np.float32), cfg)
    with pytest.raises(ValueError, match="8x8 for this model, got 16x16"):
        vit_forward(params, np.zeros((2, 16, 16, 3), np.float32), cfg)
    with pytest.raises(ValueError, match="floating point"):
        vit_forward(params, ok.astype(np.uint8), cfg)
    with pytest.raises(ValueError, match="float64 but the parameters are float32"):
        vit_forward(params, ok.astype(np.float64), cfg)
    with pytest.raises(ValueError, match="head.w has shape"):
        check_params(params, cfg.replace(num_classes=7))


@pytest.mark.parametrize("kwargs,message", [
    ({"image_size": 30, "patch_size": 4}, "image size 30 is not divisible by patch size 4"),
    ({"width": 10, "heads": 3}, "width 10 is not divisible by heads 3"),
    ({"pooling": "max"}, "pooling must be one of"),
    ({"gelu": "relu"}, "gelu must be one of"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"depth": 0}, "depth must be a positive integer, got 0"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_config_lookup_and_round_trip():
    assert get_config("ViT-B/16") == CONFIGS["vit-b16"]
    cfg = get_config("test", image_size=(8, 12))
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("vit-z99")


@requires_gpu
def test_cpu_and_gpu_agree():
    cfg = get_config("test", gelu="exact")
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    results = {}
    for device in ("cpu", "gpu"):
        params = init_params(cfg, seed=3, dtype=np.float64, device=device)
        params = unflatten({k: v + 0.1 for k, v in flatten(params).items()})
        xp = np if device == "cpu" else CUPY
        logits, cache = vit_forward(params, xp.asarray(x), cfg, train=True, rng=np.random.default_rng(1))
        dx, grads = vit_backward(xp.ones_like(logits), cache)
        results[device] = [logits, dx] + list(flatten(grads).values())
    for a, b in zip(results["cpu"], results["gpu"]):
        np.testing.assert_allclose(a, CUPY.asnumpy(b), rtol=1e-9, atol=1e-11)
