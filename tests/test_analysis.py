"""Tests for minivit.analysis against closed forms, hand-computed cases and naive loop references."""
import numpy as np
import pytest

from minivit import analysis as an


def softmax_attention(rng, B, nh, N):
    """Random attention probabilities (B, nh, N, N), rows sum to 1."""
    logits = rng.normal(size=(B, nh, N, N)) * 2.0
    a = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return a / a.sum(axis=-1, keepdims=True)


def one_hot_attention(targets, B, nh, n_prefix):
    """targets: (G,) key patch for each query patch -> (B, nh, N, N) attention, class token row/col uniform."""
    G = len(targets)
    N = n_prefix + G
    a = np.zeros((B, nh, N, N))
    a[:, :, :n_prefix, :] = 1.0 / N                                # class token's own row: anything valid
    a[:, :, n_prefix + np.arange(G), n_prefix + np.asarray(targets)] = 1.0
    return a


# ------------------------------------------------------------------------------------------------------------
# attention_map

@pytest.mark.parametrize("n_prefix", [0, 1])
def test_attention_map_shapes_and_values(n_prefix):
    rng = np.random.default_rng(0)
    gh, gw, B, nh = 3, 4, 2, 5
    N = n_prefix + gh * gw
    attn = softmax_attention(rng, B, nh, N)
    m = an.attention_map(attn, n_prefix, (gh, gw))
    assert m.shape == (B, nh, gh, gw)
    if n_prefix:
        np.testing.assert_allclose(m.reshape(B, nh, -1), attn[:, :, 0, 1:])
        # not renormalized: the weight on the class token is what is missing
        np.testing.assert_allclose(m.sum(axis=(-2, -1)), 1.0 - attn[:, :, 0, 0])
    else:
        np.testing.assert_allclose(m.reshape(B, nh, -1), attn.mean(axis=2))
        np.testing.assert_allclose(m.sum(axis=(-2, -1)), 1.0)
    r = an.attention_map(attn, n_prefix, (gh, gw), renormalize=True)
    np.testing.assert_allclose(r.sum(axis=(-2, -1)), 1.0)
    # a chosen patch: (row, col) and the flat index agree and read that query's row
    q1 = an.attention_map(attn, n_prefix, (gh, gw), query=(2, 1))
    q2 = an.attention_map(attn, n_prefix, (gh, gw), query=2 * gw + 1)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_allclose(q1.reshape(B, nh, -1), attn[:, :, n_prefix + 2 * gw + 1, n_prefix:])


def test_attention_map_bad_input():
    attn = np.full((1, 1, 5, 5), 0.2)
    with pytest.raises(ValueError, match="shape"):
        an.attention_map(attn, 1, (3, 3))
    with pytest.raises(ValueError, match="query"):
        an.attention_map(attn, 1, (2, 2), query=(2, 0))
    with pytest.raises(ValueError, match="query"):
        an.attention_map(attn, 1, (2, 2), query=4)


# ------------------------------------------------------------------------------------------------------------
# attention rollout

def rollout_reference(attns, residual):
    """Naive loops: per image, R = A_L ... A_1 with A the head mean (+ I, rows renormalized)."""
    B, _, N, _ = attns[0].shape
    out = np.zeros((B, N, N))
    for b in range(B):
        R = np.eye(N)
        for a in attns:
            A = a[b].mean(axis=0)
            if residual:
                A = 0.5 * A + 0.5 * np.eye(N)                      # A&Z's form; rows of A sum to 1
            R = A @ R
        out[b] = R
    return out


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_matches_reference_and_rows_sum_to_one(residual):
    rng = np.random.default_rng(1)
    attns = [softmax_attention(rng, 2, 3, 10) for _ in range(4)]
    R = an.attention_rollout_matrix(attns, residual=residual)
    assert R.shape == (2, 10, 10)
    np.testing.assert_allclose(R, rollout_reference(attns, residual), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(R.sum(axis=-1), 1.0, rtol=1e-12)


def test_rollout_order_first_layer_rightmost():
    rng = np.random.default_rng(2)
    a1, a2 = softmax_attention(rng, 1, 1, 6), softmax_attention(rng, 1, 1, 6)
    R = an.attention_rollout_matrix([a1, a2], residual=False)
    np.testing.assert_allclose(R[0], a2[0, 0] @ a1[0, 0])
    assert not np.allclose(R[0], a1[0, 0] @ a2[0, 0])


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("n_prefix", [0, 1])
def test_rollout_of_uniform_attention_is_uniform(residual, n_prefix):
    gh, gw, L = 3, 4, 5
    N = n_prefix + gh * gw
    attns = [np.full((2, 3, N, N), 1.0 / N) for _ in range(L)]
    m = an.attention_rollout(attns, n_prefix, (gh, gw), residual=residual)
    assert m.shape == (2, gh, gw)
    np.testing.assert_allclose(m, m[0, 0, 0])                      # the same weight on every patch
    if not residual:
        np.testing.assert_allclose(an.attention_rollout_matrix(attns, residual=False), 1.0 / N)
        np.testing.assert_allclose(m, 1.0 / N)
    np.testing.assert_allclose(an.attention_rollout(attns, n_prefix, (gh, gw), residual, renormalize=True),
                               1.0 / (gh * gw))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("n_prefix", [0, 1])
def test_rollout_of_identity_attention_is_identity(residual, n_prefix):
    gh, gw = 2, 3
    N = n_prefix + gh * gw
    attns = [np.broadcast_to(np.eye(N), (2, 4, N, N)).copy() for _ in range(3)]
    R = an.attention_rollout_matrix(attns, residual=residual)
    np.testing.assert_allclose(R, np.broadcast_to(np.eye(N), (2, N, N)))
    m = an.attention_rollout(attns, n_prefix, (gh, gw), residual=residual)
    # the class token only ever attends to itself: nothing from the patches; a 'gap' model's mean row: uniform
    np.testing.assert_allclose(m, 0.0 if n_prefix else 1.0 / (gh * gw))


def test_rollout_accepts_stacked_array_and_rejects_empty():
    rng = np.random.default_rng(3)
    attns = np.stack([softmax_attention(rng, 1, 2, 5) for _ in range(3)])    # (L, B, nh, N, N)
    m = an.attention_rollout(attns, 1, (2, 2))
    np.testing.assert_allclose(m, an.attention_rollout(list(attns), 1, (2, 2)))
    with pytest.raises(ValueError, match="at least one"):
        an.attention_rollout([], 1, (2, 2))


# ------------------------------------------------------------------------------------------------------------
# mean attention distance

@pytest.mark.parametrize("n_prefix", [0, 1])
def test_mean_attention_distance_on_itself_is_zero(n_prefix):
    gh, gw = 3, 5
    attns = [one_hot_attention(np.arange(gh * gw), 2, 3, n_prefix) for _ in range(2)]
    d = an.mean_attention_distance(attns, (gh, gw), patch_size=16, n_prefix=n_prefix)
    assert d.shape == (2, 3)
    np.testing.assert_allclose(d, 0.0, atol=1e-12)


@pytest.mark.parametrize("n_prefix", [0, 1])
def test_mean_attention_distance_one_step_sideways_is_one_patch(n_prefix):
    gh, gw, P = 4, 5, 8
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    targets = np.where(cols < gw - 1, rows * gw + cols + 1, rows * gw + cols - 1)   # right, else left neighbour
    a = one_hot_attention(targets, 1, 2, n_prefix)
    d = an.mean_attention_distance([a], (gh, gw), P, n_prefix)
    np.testing.assert_allclose(d, [[P, P]])


def test_mean_attention_distance_class_token_weight_is_renormalized_away():
    gh, gw, P = 3, 3, 4
    a = one_hot_attention(np.arange(9) + 3 - 9 * (np.arange(9) >= 6), 1, 1, 1)   # one row down, last row up 2
    a[:, :, 1:, :] *= 0.5
    a[:, :, 1:, 0] = 0.5                                           # half of every patch's attention on the class token
    d = an.mean_attention_distance([a], (gh, gw), P, n_prefix=1)
    expected = P * (6 * 1 + 3 * 2) / 9                             # six queries go 1 row, three go 2 rows
    np.testing.assert_allclose(d, [[expected]])


def test_mean_attention_distance_fixed_patch_by_hand_and_random_by_loops():
    gh, gw, P = 3, 4, 16
    a = one_hot_attention(np.zeros(gh * gw, dtype=int), 2, 1, 1)   # every query attends to patch (0, 0)
    hand = np.mean([P * np.hypot(r, c) for r in range(gh) for c in range(gw)])
    np.testing.assert_allclose(an.mean_attention_distance([a], (gh, gw), P, 1), [[hand]])
    # random attention against a loop over layers, heads, images and queries
    rng = np.random.default_rng(4)
    attns = [softmax_attention(rng, 2, 3, 1 + gh * gw) for _ in range(2)]
    got = an.mean_attention_distance(attns, (gh, gw), P, 1)
    ref = np.zeros((2, 3))
    for l, att in enumerate(attns):
        for h in range(3):
            vals = []
            for b in range(2):
                for q in range(gh * gw):
                    w = att[b, h, 1 + q, 1:]
                    dist = [P * np.hypot(q // gw - k // gw, q % gw - k % gw) for k in range(gh * gw)]
                    vals.append(np.dot(w, dist) / w.sum())
            ref[l, h] = np.mean(vals)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_patch_distances():
    d = an.patch_distances((2, 3), 10)
    assert d.shape == (6, 6)
    np.testing.assert_allclose(d, d.T)
    np.testing.assert_allclose(np.diag(d), 0.0)
    assert d[0, 5] == pytest.approx(10 * np.hypot(1, 2))


# ------------------------------------------------------------------------------------------------------------
# position embeddings and filters

@pytest.mark.parametrize("n_prefix", [0, 1])
def test_pos_embed_similarity(n_prefix):
    rng = np.random.default_rng(5)
    gh, gw, D = 3, 4, 16
    pe = rng.normal(size=(1, n_prefix + gh * gw, D))
    sim = an.pos_embed_similarity(pe, (gh, gw), n_prefix)
    assert sim.shape == (gh, gw, gh, gw)
    flat = sim.reshape(gh * gw, gh * gw)
    np.testing.assert_allclose(np.diag(flat), 1.0)
    np.testing.assert_allclose(flat, flat.T)
    e = pe[0, n_prefix:]
    i, j = 1 * gw + 2, 2 * gw + 0                                  # (1, 2) vs (2, 0)
    cos = e[i] @ e[j] / np.linalg.norm(e[i]) / np.linalg.norm(e[j])
    assert sim[1, 2, 2, 0] == pytest.approx(cos)
    # (N, D) without the leading 1 gives the same
    np.testing.assert_allclose(an.pos_embed_similarity(pe[0], (gh, gw), n_prefix), sim)
    with pytest.raises(ValueError, match="pos_embed"):
        an.pos_embed_similarity(pe, (gh, gw + 1), n_prefix)


def test_embedding_filters_orthonormal_sorted_and_capped():
    rng = np.random.default_rng(6)
    P, C, D = 4, 3, 40
    w = rng.normal(size=(P * P * C, D)) * np.linspace(3, 0.1, P * P * C)[:, None]
    filters, ratio = an.embedding_filters(w, P, C, k=28)
    assert filters.shape == (28, P, P, C) and ratio.shape == (28,)
    V = filters.reshape(28, -1)
    np.testing.assert_allclose(V @ V.T, np.eye(28), atol=1e-10)
    X = w.T - w.T.mean(axis=0)                                     # (D, P*P*C) the filters, centred
    var = np.linalg.eigvalsh(X.T @ X)[::-1]                        # variance along each principal axis, largest first
    np.testing.assert_allclose(ratio, var[:28] / var.sum(), rtol=1e-9)
    # more components than exist: capped at min(D, P*P*C)
    f2, r2 = an.embedding_filters(w[:, :10], P, C, k=28)
    X2 = w[:, :10].T - w[:, :10].T.mean(axis=0)                    # (10, P*P*C)
    var2 = np.linalg.eigvalsh(X2 @ X2.T)[::-1]                     # (10,) the same variances, from the small side
    assert f2.shape == (10, P, P, C)
    np.testing.assert_allclose(r2, var2 / var2.sum(), rtol=1e-9, atol=1e-12)


def test_embedding_filters_recover_a_planted_filter_in_patch_layout():
    rng = np.random.default_rng(7)
    P, C, D = 3, 2, 50
    f = rng.normal(size=(P, P, C))                                 # one filter in (row, col, channel) layout
    coef = rng.normal(size=D) * 5
    w = f.reshape(-1, 1) * coef[None, :] + 1e-3 * rng.normal(size=(P * P * C, D))   # column d = coef_d * f
    filters, ratio = an.embedding_filters(w, P, C, k=3)
    unit = f / np.linalg.norm(f)
    assert abs(np.sum(filters[0] * unit)) == pytest.approx(1.0, abs=1e-6)
    assert ratio[0] > 0.999


def test_cupy_input_if_available():
    backend = pytest.importorskip("minivit.backend")
    try:
        cp = backend.import_cupy()
    except backend.DeviceError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(8)
    attns = [softmax_attention(rng, 1, 2, 5) for _ in range(2)]
    got = an.mean_attention_distance([cp.asarray(a) for a in attns], (2, 2), 4, 1)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, an.mean_attention_distance(attns, (2, 2), 4, 1))
    np.testing.assert_allclose(an.attention_rollout([cp.asarray(a) for a in attns], 1, (2, 2)),
                               an.attention_rollout(attns, 1, (2, 2)))
