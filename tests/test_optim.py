"""Optimizers, clipping and schedules against closed forms."""
import math

import numpy as np
import pytest

from minivit.config import get_config
from minivit.model import init_params
from minivit.optim import (clip_by_global_norm, decay_mask, global_norm, lr_at, optimizer_init, optimizer_step,
                           state_from_flat, state_to_flat)
from minivit.tree import flatten, tree_map


def tiny_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4), "pos_embed": rng.standard_normal((1, 2, 4))}


def test_adam_first_step_moves_by_lr_times_sign():
    p, g = tiny_tree(0), tiny_tree(1)
    p0 = tree_map(np.copy, p)
    state = optimizer_init(p, "adam")
    optimizer_step(p, g, state, lr=1e-3, kind="adam", eps=1e-12)
    for k in p:   # mhat = g, vhat = g^2: the step is lr * g / |g|
        np.testing.assert_allclose(p[k] - p0[k], -1e-3 * np.sign(g[k]), rtol=1e-6)


def test_adamw_decay_on_zero_gradient_is_decoupled_and_masked():
    p = tiny_tree(0)
    p0 = tree_map(np.copy, p)
    zeros = tree_map(np.zeros_like, p)
    state = optimizer_init(p, "adamw")
    for _ in range(3):
        optimizer_step(p, zeros, state, lr=0.1, kind="adamw", weight_decay=0.5)
    np.testing.assert_allclose(p["w"], p0["w"] * (1 - 0.1 * 0.5) ** 3, rtol=1e-12)   # matrix: decayed
    np.testing.assert_array_equal(p["b"], p0["b"])                                  # bias: not decayed
    np.testing.assert_array_equal(p["pos_embed"], p0["pos_embed"])                  # embedding: not decayed


def test_decay_mask_on_a_vit():
    mask = decay_mask(init_params(get_config("test")))
    assert mask["blocks.0.attn.qkv_w"] and mask["patch_embed.w"] and mask["head.w"]
    assert not mask["pos_embed"] and not mask["cls_token"] and not mask["blocks.0.norm1.w"]
    assert not mask["blocks.1.mlp.fc1_b"]


def test_sgd_momentum_closed_form():
    p = {"w": np.array([[1.0]])}
    state = optimizer_init(p, "sgd")
    for _ in range(3):   # constant gradient 1: m = 1, 1.9, 2.71; p = 1 - 0.1 (1 + 1.9 + 2.71)
        optimizer_step(p, {"w": np.array([[1.0]])}, state, lr=0.1, kind="sgd", momentum=0.9)
    assert abs(p["w"][0, 0] - (1 - 0.1 * (1 + 1.9 + 2.71))) < 1e-12


def test_adam_converges_on_a_quadratic():
    p = {"w": np.array([[3.0, -2.0]])}
    state = optimizer_init(p, "adam")
    for t in range(1, 501):
        optimizer_step(p, {"w": 2 * p["w"]}, state, lr=lr_at(t, 0.1, 500, 10), kind="adam")
    assert np.abs(p["w"]).max() < 1e-2


def test_clipping_preserves_direction_and_sets_norm():
    g = tiny_tree(2)
    before = np.concatenate([v.ravel() for v in flatten(g).values()])
    norm = clip_by_global_norm(g, 1.0)
    after = np.concatenate([v.ravel() for v in flatten(g).values()])
    assert abs(norm - np.linalg.norm(before)) < 1e-12
    assert abs(global_norm(g) - 1.0) < 1e-5
    np.testing.assert_allclose(after / np.linalg.norm(after), before / np.linalg.norm(before), rtol=1e-12)
    small = {"w": np.array([0.1, 0.2])}
    clip_by_global_norm(small, 1.0)
    np.testing.assert_array_equal(small["w"], [0.1, 0.2])   # under the limit: untouched


def test_schedule_values():
    # warmup 10 to lr 1, then cosine over 100 steps
    assert lr_at(5, 1.0, 100, 10) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, 10) == pytest.approx(0.5)                      # halfway: cos(pi/2) = 0
    assert lr_at(100, 1.0, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(40, 1.0, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert lr_at(55, 2.0, 100, 10, schedule="linear") == pytest.approx(1.0)
    assert lr_at(77, 0.3, 100, 0, schedule="constant") == 0.3
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(1, 1.0, 10, schedule="step")


def test_state_round_trip():
    p = tiny_tree(0)
    state = optimizer_init(p, "adamw")
    optimizer_step(p, tiny_tree(1), state, lr=0.01)
    back = state_from_flat(state_to_flat(state), p)
    assert back["step"] == 1
    for a, b in zip(flatten(state["m"]).values(), flatten(back["m"]).values()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(flatten(state["v"]).values(), flatten(back["v"]).values()):
        np.testing.assert_array_equal(a, b)


def test_float32_update_stays_float32():
    cfg = get_config("test")
    p = init_params(cfg)
    g = tree_map(lambda v: np.ones_like(v), p)
    state = optimizer_init(p, "adamw")
    optimizer_step(p, g, state, lr=1e-3, weight_decay=0.1)
    assert all(v.dtype == np.float32 for v in flatten(p).values())
    assert all(v.dtype == np.float32 for v in flatten(state["v"]).values())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_update_matches_gradients_by_name_not_by_order(kind):
    """vit_backward builds its gradient tree in backward order (head first); the optimizer must pair each gradient
    with its parameter by name: a reversed gradient dict gives the identical update."""
    p1, p2, g = tiny_tree(0), tiny_tree(0), tiny_tree(1)
    g_reversed = dict(reversed(list(g.items())))
    assert list(g_reversed) != list(p1)
    s1, s2 = optimizer_init(p1, kind), optimizer_init(p2, kind)
    for _ in range(2):
        optimizer_step(p1, g, s1, 1e-2, kind=kind, weight_decay=0.1)
        optimizer_step(p2, g_reversed, s2, 1e-2, kind=kind, weight_decay=0.1)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    with pytest.raises(ValueError, match=r"missing \['w'\]"):
        optimizer_step(p1, {k: v for k, v in g.items() if k != "w"}, s1, 1e-2, kind=kind)
