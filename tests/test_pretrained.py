"""Pretrained checkpoints: the original ViT .npz layout and timm .safetensors, loaded, checked and exported.

The fixtures are written here from the documented layout (Flax key names and shapes spelled out literally, timm
names derived by hand), not with minivit's name tables; the references are short independent forward passes
over the raw file arrays (a strided convolution as a loop over kernel offsets, attention per head from the
(D, nh, hs) kernels), and, where torch is installed, the same model in PyTorch on the timm-named tensors.
"""
import json
import math
import re
import struct

import numpy as np
import pytest

from minivit.backend import get_backend, to_device, to_numpy
from minivit.config import CONFIGS, count_params
from minivit.finetune import new_head, resize_model
from minivit.inference import read_labels
from minivit.model import attention_probs, vit_forward
from minivit.pretrained import (CheckpointError, Loaded, checkpoint_format, export_npz, export_safetensors,
                                infer_npz_config, infer_timm_config, load_npz, load_pretrained, load_safetensors,
                                read_npz)
from minivit.resample import resample_pos_embed
from minivit.safetensors import read_safetensors, save_safetensors
from minivit.tree import flatten


# ----------------------------------------------------------------------------------------------------------------
# Fixtures in the original layout, written from the documented shapes

SMALL = dict(P=2, C=3, D=8, nh=2, M=12, depth=2, K=5, grid=(3, 3))


def flax_shapes(P, C, D, nh, M, depth, K, grid, token=True, rep=0):
    """{key: shape} of the original ViT layout, spelled out as in the paper's checkpoints."""
    hs, N = D // nh, grid[0] * grid[1] + (1 if token else 0)
    s = {"embedding/kernel": (P, P, C, D), "embedding/bias": (D,)}
    if token:
        s["cls"] = (1, 1, D)
    s["Transformer/posembed_input/pos_embedding"] = (1, N, D)
    for i in range(depth):
        t = f"Transformer/encoderblock_{i}/"
        s[t + "LayerNorm_0/scale"] = s[t + "LayerNorm_0/bias"] = (D,)
        for n in ("query", "key", "value"):
            s[t + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (D, nh, hs)
            s[t + f"MultiHeadDotProductAttention_1/{n}/bias"] = (nh, hs)
        s[t + "MultiHeadDotProductAttention_1/out/kernel"] = (nh, hs, D)
        s[t + "MultiHeadDotProductAttention_1/out/bias"] = (D,)
        s[t + "LayerNorm_2/scale"] = s[t + "LayerNorm_2/bias"] = (D,)
        s[t + "MlpBlock_3/Dense_0/kernel"], s[t + "MlpBlock_3/Dense_0/bias"] = (D, M), (M,)
        s[t + "MlpBlock_3/Dense_1/kernel"], s[t + "MlpBlock_3/Dense_1/bias"] = (M, D), (D,)
    s["Transformer/encoder_norm/scale"] = s["Transformer/encoder_norm/bias"] = (D,)
    if rep:
        s["pre_logits/kernel"], s["pre_logits/bias"] = (D, rep), (rep,)
    s["head/kernel"], s["head/bias"] = (rep or D, K), (K,)
    return s


def flax_checkpoint(seed=0, token=True, rep=0, prefix="", **sizes):
    """{key: float64 array}: known random values (LayerNorm scales near 1, everything else non-trivial)."""
    rng = np.random.default_rng(seed)
    shapes = flax_shapes(**{**SMALL, **sizes}, token=token, rep=rep)
    w = {k: (1.0 + 0.2 * rng.standard_normal(s)) if k.endswith("/scale") else 0.5 * rng.standard_normal(s)
         for k, s in shapes.items()}
    return {prefix + k: v for k, v in w.items()}


def images_for(w, B=2, seed=1):
    P, _, C, _ = w["embedding/kernel"].shape
    gh, gw = w.get("_grid", (3, 3))
    return np.random.default_rng(seed).uniform(-1, 1, (B, gh * P, gw * P, C))


def _ln(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x, form):
    if form == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def embed_by_hand(w, x):
    """The patch embedding as a strided convolution over the raw (P, P, C, D) kernel, class token, positions."""
    kern, P = w["embedding/kernel"], w["embedding/kernel"].shape[0]
    B, H, W, _ = x.shape
    emb = 0.0
    for i in range(P):                                 # kernel row
        for j in range(P):                             # kernel column: pixel (r*P + i, c*P + j) of patch (r, c)
            emb = emb + np.einsum("brcC,CD->brcD", x[:, i::P, j::P, :], kern[i, j])
    z = (emb + w["embedding/bias"]).reshape(B, (H // P) * (W // P), -1)     # patches in row-major order
    if "cls" in w:
        z = np.concatenate([np.broadcast_to(w["cls"], (B, 1, z.shape[-1])), z], axis=1)
    return z + w["Transformer/posembed_input/pos_embedding"]


def reference_forward(w, x, gelu="tanh"):
    """Logits and attention maps straight from the raw Flax arrays (no minivit code)."""
    z = embed_by_hand(w, x)
    depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    attn = []
    for i in range(depth):
        t = lambda n: w[f"Transformer/encoderblock_{i}/{n}"]
        a = "MultiHeadDotProductAttention_1/"
        h = _ln(z, t("LayerNorm_0/scale"), t("LayerNorm_0/bias"))
        q, k, v = (np.einsum("bnd,dhs->bhns", h, t(a + n + "/kernel")) + t(a + n + "/bias")[None, :, None, :]
                   for n in ("query", "key", "value"))
        s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attn.append(p)
        z = z + np.einsum("bhns,hsd->bnd", p @ v, t(a + "out/kernel")) + t(a + "out/bias")
        h = _ln(z, t("LayerNorm_2/scale"), t("LayerNorm_2/bias"))
        h = _gelu(h @ t("MlpBlock_3/Dense_0/kernel") + t("MlpBlock_3/Dense_0/bias"), gelu)
        z = z + h @ t("MlpBlock_3/Dense_1/kernel") + t("MlpBlock_3/Dense_1/bias")
    z = _ln(z, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"])
    pooled = z[:, 0] if "cls" in w else z.mean(1)
    if "pre_logits/kernel" in w:
        pooled = np.tanh(pooled @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return pooled @ w["head/kernel"] + w["head/bias"], attn


def save(tmp_path, w, name="ckpt.npz"):
    path = tmp_path / name
    with open(path, "wb") as f:                                             # a handle: np.savez adds no suffix
        np.savez(f, **w)
    return path


def params_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    return list(fa) == list(fb) and all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


# ----------------------------------------------------------------------------------------------------------------
# Config inference and the name mapping

def test_infers_config_and_counts_from_original_layout(tmp_path):
    w = flax_checkpoint()
    params, cfg = load_npz(save(tmp_path, w))
    assert (cfg.patch_size, cfg.channels, cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim) == (2, 3, 8, 2, 2, 12)
    assert (cfg.num_classes, cfg.image_size, cfg.pooling, cfg.representation_size) == (5, 6, "token", 0)
    assert (cfg.gelu, cfg.ln_eps) == ("tanh", 1e-6)
    assert count_params(cfg) == sum(a.size for a in w.values())
    assert all(v.dtype == np.float32 for v in flatten(params).values())


@pytest.mark.parametrize("variant,sizes,expect", [
    ({"token": True, "rep": 0}, {}, dict(pooling="token", representation_size=0)),
    ({"token": False, "rep": 0}, {}, dict(pooling="gap", representation_size=0)),
    ({"token": True, "rep": 6}, {}, dict(pooling="token", representation_size=6)),
    ({"token": False, "rep": 6}, {"K": 3, "nh": 4, "depth": 3}, dict(pooling="gap", representation_size=6)),
])
def test_variants_infer_and_count(tmp_path, variant, sizes, expect):
    w = flax_checkpoint(**variant, **sizes)
    _, cfg = load_npz(save(tmp_path, w))
    for k, v in expect.items():
        assert getattr(cfg, k) == v
    assert (cfg.heads, cfg.depth, cfg.num_classes) == (sizes.get("nh", 2), sizes.get("depth", 2), sizes.get("K", 5))
    assert count_params(cfg) == sum(a.size for a in w.values())


def test_paper_sizes_from_shapes_alone():
    b16 = flax_shapes(P=16, C=3, D=768, nh=12, M=3072, depth=12, K=1000, grid=(14, 14))
    cfg = infer_npz_config(b16)
    assert cfg == CONFIGS["vit-b16"] and count_params(cfg) == 86_567_656
    gap = infer_npz_config(flax_shapes(P=16, C=3, D=768, nh=12, M=3072, depth=12, K=1000, grid=(14, 14), token=False))
    assert gap.pooling == "gap" and count_params(gap) == 86_566_120          # the original code's ViT-B/16-gap
    in21k = flax_shapes(P=16, C=3, D=768, nh=12, M=3072, depth=12, K=21843, grid=(14, 14), rep=768)
    cfg = infer_npz_config(in21k)
    assert cfg.representation_size == 768 and count_params(cfg) == sum(math.prod(s) for s in in21k.values())
    h14 = infer_npz_config(flax_shapes(P=14, C=3, D=1280, nh=16, M=5120, depth=32, K=1000, grid=(16, 16)))
    assert h14 == CONFIGS["vit-h14"] and count_params(h14) == 632_045_800
    b16_384 = infer_npz_config(flax_shapes(P=16, C=3, D=768, nh=12, M=3072, depth=12, K=1000, grid=(24, 24)))
    assert b16_384.image_size == 384


def test_one_head_attention_by_hand(tmp_path):
    """Head h of block 0: q_h = LN_0(z0) @ query/kernel[:, h] + bias[h], same for k; A = softmax(q k^T / sqrt(hs))."""
    w = flax_checkpoint(nh=4, D=12)
    params, cfg = load_npz(save(tmp_path, w), dtype=np.float64)
    x = images_for(w)
    _, cache = vit_forward(params, x, cfg)
    z0 = embed_by_hand(w, x)                                                  # (B, N, D) from the raw kernel
    t = "Transformer/encoderblock_0/"
    h0 = _ln(z0, w[t + "LayerNorm_0/scale"], w[t + "LayerNorm_0/bias"])
    for h in (1, 3):
        q = h0 @ w[t + "MultiHeadDotProductAttention_1/query/kernel"][:, h] + w[t + "MultiHeadDotProductAttention_1/query/bias"][h]
        k = h0 @ w[t + "MultiHeadDotProductAttention_1/key/kernel"][:, h] + w[t + "MultiHeadDotProductAttention_1/key/bias"][h]
        s = q @ k.swapaxes(-1, -2) / math.sqrt(12 // 4)                      # (B, N, N)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        np.testing.assert_allclose(attention_probs(cache)[0][:, h], a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", [
    dict(token=True), dict(token=False), dict(token=True, rep=6), dict(token=False, rep=4),
    dict(token=True, prefix="opt/target/"), dict(token=True, grid=(2, 4)), dict(token=False, grid=(3, 2), nh=4),
])
def test_logits_match_independent_forward(tmp_path, variant):
    w = flax_checkpoint(**variant)
    grid = variant.get("grid", (3, 3))
    kw = {"grid": grid} if grid[0] != grid[1] else {}
    loaded = load_npz(save(tmp_path, w), dtype=np.float64, **kw)
    assert loaded.prefix == variant.get("prefix", "") and loaded.source == "npz"
    raw = {k[len(loaded.prefix):]: v for k, v in w.items()}
    raw["_grid"] = grid
    x = images_for(raw)
    ref, ref_attn = reference_forward({k: v for k, v in raw.items() if k != "_grid"}, x)
    logits, cache = vit_forward(loaded.params, x, loaded.cfg)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-12)
    for got, want in zip(attention_probs(cache), ref_attn):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_prefix_and_ignored_keys(tmp_path):
    plain = load_npz(save(tmp_path, flax_checkpoint(), "plain.npz"))
    w = flax_checkpoint(prefix="opt/target/")
    w["opt/state/step"] = np.array(1000)
    w["opt/state/param_states/cls/momentum"] = np.zeros((1, 1, 8))
    path = save(tmp_path, w)
    assert sorted(read_npz(path)) == sorted(w)
    loaded = load_npz(path)
    assert loaded.prefix == "opt/target/"
    assert set(loaded.ignored) == {"opt/state/step", "opt/state/param_states/cls/momentum"}
    assert loaded.cfg == plain.cfg and params_equal(loaded.params, plain.params)


# ----------------------------------------------------------------------------------------------------------------
# Errors

def test_shape_mismatch_names_file_key_and_shapes(tmp_path):
    w = flax_checkpoint()
    w["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"] = np.zeros(9)
    path = save(tmp_path, w)
    with pytest.raises(CheckpointError) as e:
        load_npz(path)
    msg = str(e.value)
    assert str(path) in msg and "'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'" in msg
    assert "expected (8,)" in msg and "found (9,)" in msg


def test_missing_and_unexpected_keys_are_named(tmp_path):
    w = flax_checkpoint()
    del w["Transformer/encoderblock_1/LayerNorm_2/scale"]
    del w["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias"]
    w["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_npz(save(tmp_path, w))
    assert set(e.value.missing) == {"Transformer/encoderblock_1/LayerNorm_2/scale",
                                    "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias"}
    assert e.value.unexpected == ("Transformer/encoderblock_0/extra/kernel",)
    for k in e.value.missing + e.value.unexpected:
        assert repr(k) in str(e.value)
    w = flax_checkpoint(depth=3)
    for k in [k for k in w if k.startswith("Transformer/encoderblock_1/")]:
        del w[k]                                                              # a whole block gone
    with pytest.raises(CheckpointError, match="missing keys \\(16\\)"):
        load_npz(save(tmp_path, w))


def test_missing_head_allowed_gives_zero_head(tmp_path):
    w = flax_checkpoint(rep=6)
    del w["head/kernel"], w["head/bias"]
    path = save(tmp_path, w)
    with pytest.raises(CheckpointError, match="head/kernel") as e:
        load_npz(path)
    assert "allow_missing" in str(e.value)
    with pytest.raises(CheckpointError, match="'head/kernel'"):
        load_npz(path, num_classes=7)                                        # K known, but not allowed
    assert load_npz(path, allow_missing="head", num_classes=7).filled == ("head.w", "head.b")
    loaded = load_npz(path, allow_missing=("head",), num_classes=7)
    assert loaded.cfg.num_classes == 7 and loaded.cfg.representation_size == 6
    assert loaded.filled == ("head.w", "head.b")
    assert loaded.params["head"]["w"].shape == (6, 7) and not loaded.params["head"]["w"].any()
    logits, _ = vit_forward(loaded.params, images_for(w).astype(np.float32), loaded.cfg)
    assert logits.shape == (2, 7) and not logits.any()
    with pytest.raises(ValueError, match="allow_missing"):
        load_npz(path, allow_missing=("blocks",), num_classes=7)


def test_num_classes_must_agree_with_file(tmp_path):
    with pytest.raises(CheckpointError, match="num_classes=4 but 'head/kernel' has 5 classes"):
        load_npz(save(tmp_path, flax_checkpoint()), num_classes=4)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "nope.npz")
    path = save(tmp_path, flax_checkpoint())
    data = path.read_bytes()
    for name, content in [("truncated.npz", data[: len(data) // 2]), ("garbage.npz", b"\x00garbage" * 50),
                          ("empty.npz", b"")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            load_npz(bad)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="not an .npz archive"):
        load_npz(tmp_path / "one.npy")
    w = flax_checkpoint()
    w["cls"] = np.array([None, 1], dtype=object)                             # pickled: refused
    with pytest.raises(CheckpointError, match="'cls'"):
        load_npz(save(tmp_path, w, "pickled.npz"))


def test_non_square_grid_needs_grid(tmp_path):
    path = save(tmp_path, flax_checkpoint(grid=(2, 4)))
    with pytest.raises(CheckpointError, match="grid=") as e:
        load_npz(path)
    assert "'Transformer/posembed_input/pos_embedding' has 9 positions" in str(e.value)
    with pytest.raises(CheckpointError, match="grid 4x4 = 16 positions"):
        load_npz(path, grid=(4, 4))
    cfg = load_npz(path, grid=(2, 4)).cfg
    assert cfg.grid == (2, 4) and cfg.image_size == (4, 8)


def test_npz_bfloat16_saved_by_jax_is_upcast(tmp_path):
    """np.savez stores a JAX/ml_dtypes bfloat16 array as 2-byte void ('|V2'): read as bfloat16 bits."""
    w = flax_checkpoint()
    cls = bf16_exact(np.random.default_rng(3), (1, 1, 8))
    w["cls"] = (np.float32(cls).view(np.uint32) >> 16).astype(np.uint16).view("V2")
    params, _ = load_npz(save(tmp_path, w), dtype=np.float64)
    assert np.array_equal(params["cls_token"], cls)


def test_big_vision_layout_is_refused_by_name(tmp_path):
    w = flax_checkpoint(prefix="params/")
    w["params/pos_embedding"] = w.pop("params/Transformer/posembed_input/pos_embedding")
    with pytest.raises(CheckpointError, match="big_vision"):
        load_npz(save(tmp_path, w))


# ----------------------------------------------------------------------------------------------------------------
# Export

@pytest.mark.parametrize("variant", [dict(), dict(token=False), dict(rep=6), dict(grid=(2, 4))])
def test_export_reproduces_the_original_file(tmp_path, variant):
    w = flax_checkpoint(**variant)
    grid = variant.get("grid", (3, 3))
    kw = {"grid": grid} if grid[0] != grid[1] else {}
    params, cfg = load_npz(save(tmp_path, w), dtype=np.float64, **kw)
    export_npz(params, cfg, tmp_path / "out.npz", dtype=np.float64)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(w)
        for k in w:
            assert z[k].shape == w[k].shape and np.array_equal(z[k], w[k]), k


@pytest.mark.parametrize("variant", [dict(), dict(token=False, rep=6), dict(grid=(2, 4))])
def test_export_load_round_trip(tmp_path, variant):
    grid = variant.get("grid", (3, 3))
    kw = {"grid": grid} if grid[0] != grid[1] else {}
    params, cfg = load_npz(save(tmp_path, flax_checkpoint(**variant)), **kw)   # float32
    x = images_for({**flax_checkpoint(), "_grid": grid}).astype(np.float32)
    logits, _ = vit_forward(params, x, cfg)
    for prefix in ("", "opt/target/"):
        export_npz(params, cfg, tmp_path / "rt.npz", prefix=prefix)
        back = load_npz(tmp_path / "rt.npz", **kw)
        assert back.cfg == cfg and back.prefix == prefix and params_equal(back.params, params)
        assert np.array_equal(vit_forward(back.params, x, back.cfg)[0], logits)
    gelu_exact = cfg.replace(gelu="exact")
    export_safetensors(params, gelu_exact, tmp_path / "rt.safetensors")
    back = load_safetensors(tmp_path / "rt.safetensors", **kw)               # heads from the file's metadata
    assert back.cfg == gelu_exact and params_equal(back.params, params)


# ----------------------------------------------------------------------------------------------------------------
# safetensors

def timm_tensors(w):
    """The timm state dict of a Flax fixture, converted by hand (PyTorch weights are (out, in))."""
    D = w["embedding/bias"].shape[0]
    t = {"patch_embed.proj.weight": w["embedding/kernel"].transpose(3, 2, 0, 1),   # (P, P, C, D) -> (D, C, P, P)
         "patch_embed.proj.bias": w["embedding/bias"]}
    if "cls" in w:
        t["cls_token"] = w["cls"]
    t["pos_embed"] = w["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        f, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = f + "MultiHeadDotProductAttention_1/"
        t[b + "norm1.weight"], t[b + "norm1.bias"] = w[f + "LayerNorm_0/scale"], w[f + "LayerNorm_0/bias"]
        t[b + "attn.qkv.weight"] = np.concatenate([w[a + n + "/kernel"].reshape(D, D) for n in ("query", "key", "value")], 1).T
        t[b + "attn.qkv.bias"] = np.concatenate([w[a + n + "/bias"].reshape(D) for n in ("query", "key", "value")])
        t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = w[a + "out/kernel"].reshape(D, D).T, w[a + "out/bias"]
        t[b + "norm2.weight"], t[b + "norm2.bias"] = w[f + "LayerNorm_2/scale"], w[f + "LayerNorm_2/bias"]
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = w[f + "MlpBlock_3/Dense_0/kernel"].T, w[f + "MlpBlock_3/Dense_0/bias"]
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = w[f + "MlpBlock_3/Dense_1/kernel"].T, w[f + "MlpBlock_3/Dense_1/bias"]
        i += 1
    t["norm.weight"], t["norm.bias"] = w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"]
    if "pre_logits/kernel" in w:
        t["pre_logits.fc.weight"], t["pre_logits.fc.bias"] = w["pre_logits/kernel"].T, w["pre_logits/bias"]
    t["head.weight"], t["head.bias"] = w["head/kernel"].T, w["head/bias"]
    return t


def write_safetensors_by_hand(path, entries, metadata=None, pad=True):
    """entries: {name: (dtype code, shape, raw little-endian bytes)} -> the file, laid out as the format says."""
    header, blob = ({"__metadata__": metadata} if metadata else {}), b""
    for name, (code, shape, data) in entries.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + blob)


def bf16_exact(rng, shape):
    """Values exactly representable in bfloat16 (8 significant bits): k / 64 for |k| < 256."""
    return rng.integers(-255, 256, size=shape) / 64.0


@pytest.mark.parametrize("variant", [dict(), dict(token=False), dict(rep=6)])
def test_timm_safetensors_by_hand_matches_npz(tmp_path, variant):
    w = flax_checkpoint(**variant)
    rng = np.random.default_rng(5)
    w["Transformer/posembed_input/pos_embedding"] = bf16_exact(rng, w["Transformer/posembed_input/pos_embedding"].shape)
    w["Transformer/encoder_norm/scale"] = np.float16(1 + 0.2 * rng.standard_normal(8)).astype(np.float64)
    entries = {}
    for name, a in timm_tensors(w).items():
        if name == "pos_embed":                                              # bf16: the high 16 bits of float32
            bits = (np.float32(a).view(np.uint32) >> 16).astype("<u2")
            entries[name] = ("BF16", a.shape, bits.tobytes())
        elif name == "norm.weight":
            entries[name] = ("F16", a.shape, a.astype("<f2").tobytes())
        elif name.endswith("bias"):
            entries[name] = ("F32", a.shape, a.astype("<f4").tobytes())
        else:
            entries[name] = ("F64", a.shape, a.astype("<f8").tobytes())
    write_safetensors_by_hand(tmp_path / "model.safetensors", entries, {"format": "pt"})
    for k in w:
        if k.endswith("bias"):
            w[k] = w[k].astype(np.float32).astype(np.float64)                 # what the F32 entries hold
    npz = load_npz(save(tmp_path, w), dtype=np.float64, gelu="exact")
    st = load_safetensors(tmp_path / "model.safetensors", heads=2, dtype=np.float64)
    assert st.cfg == npz.cfg and st.cfg.gelu == "exact" and st.source == "safetensors"
    assert st.metadata == {"format": "pt"}
    assert params_equal(st.params, npz.params)
    x = images_for(w)
    ref, _ = reference_forward(w, x, gelu="exact")
    np.testing.assert_allclose(vit_forward(st.params, x, st.cfg)[0], ref, rtol=0, atol=1e-12)


def test_timm_heads_from_paper_width_or_argument(tmp_path):
    shapes = {k: s.shape for k, s in timm_tensors(flax_checkpoint()).items()}
    with pytest.raises(CheckpointError, match="heads="):
        infer_timm_config(shapes)                                           # width 8 is none of the paper's
    assert infer_timm_config(shapes, heads=4).heads == 4
    D, M = 768, 3072
    timm_b16 = {"patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,), "cls_token": (1, 1, D),
                "pos_embed": (1, 197, D), "norm.weight": (D,), "norm.bias": (D,), "head.weight": (1000, D),
                "head.bias": (1000,)}
    for i in range(12):
        for n, s in [("norm1", D), ("norm2", D)]:
            timm_b16[f"blocks.{i}.{n}.weight"] = timm_b16[f"blocks.{i}.{n}.bias"] = (s,)
        for n, (o, k) in [("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("mlp.fc1", (M, D)), ("mlp.fc2", (D, M))]:
            timm_b16[f"blocks.{i}.{n}.weight"], timm_b16[f"blocks.{i}.{n}.bias"] = (o, k), (o,)
    assert infer_timm_config(timm_b16) == CONFIGS["vit-b16"].replace(gelu="exact")


def test_timm_unsupported_keys_are_named(tmp_path):
    t = timm_tensors(flax_checkpoint(token=False))
    t["fc_norm.weight"], t["fc_norm.bias"] = t.pop("norm.weight"), t.pop("norm.bias")
    save_safetensors(t, tmp_path / "avg.safetensors")
    with pytest.raises(CheckpointError, match="fc_norm") as e:
        load_safetensors(tmp_path / "avg.safetensors", heads=2)
    assert set(e.value.unexpected) == {"fc_norm.weight", "fc_norm.bias"}
    assert set(e.value.missing) == {"norm.weight", "norm.bias"}


def test_save_safetensors_layout_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.float16([1.5, -2.25]),
              "c": rng.standard_normal(5), "d": np.arange(6, dtype=np.int64).reshape(2, 3),
              "e": np.array([True, False]), "s": np.array(2.5, dtype=np.float32)}
    path = tmp_path / "t.safetensors"
    save_safetensors(arrays, path, {"note": "hi"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header.pop("__metadata__") == {"note": "hi"}
    assert [header[k]["dtype"] for k in arrays] == ["F32", "F16", "F64", "I64", "BOOL", "F32"]
    end = 0
    for k, a in arrays.items():                                              # contiguous, in order, little-endian
        b, e = header[k]["data_offsets"]
        assert b == end and header[k]["shape"] == list(a.shape)
        assert raw[8 + n + b: 8 + n + e] == a.astype(a.dtype.newbyteorder("<")).tobytes()
        end = e
    assert 8 + n + end == len(raw)
    back, meta = read_safetensors(path)
    assert meta == {"note": "hi"}
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape and np.array_equal(back[k], a)


def test_read_safetensors_by_hand_bf16_and_unpadded(tmp_path):
    vals = np.array([1.0, -2.5, 2.0 ** -7, 1.5 * 2.0 ** 126, -0.0, np.inf], dtype=np.float32)
    bits = (vals.view(np.uint32) >> 16).astype("<u2")                       # exactly representable values
    write_safetensors_by_hand(tmp_path / "b.safetensors", {"x": ("BF16", (6,), bits.tobytes()),
                                                           "y": ("F32", (1, 2), np.float32([7, 8]).tobytes())}, pad=False)
    back, meta = read_safetensors(tmp_path / "b.safetensors")
    assert meta == {} and back["x"].dtype == np.float32 and np.array_equal(back["x"], vals)
    assert back["y"].shape == (1, 2) and np.array_equal(back["y"], [[7, 8]])


def test_bad_safetensors_files(tmp_path):
    good = tmp_path / "g.safetensors"
    save_safetensors({"x": np.zeros((4, 4), np.float32)}, good)
    data = good.read_bytes()
    cases = {"truncated": data[:-10], "short": data[:5], "huge-header": struct.pack("<Q", 10 ** 9) + data[8:],
             "bad-json": data[:8] + b"}" + data[9:]}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            read_safetensors(bad)
    write_safetensors_by_hand(tmp_path / "f8.safetensors", {"w": ("F8_E4M3", (2,), b"\x00\x01")})
    with pytest.raises(CheckpointError, match="'w' has dtype F8_E4M3"):
        read_safetensors(tmp_path / "f8.safetensors")


def test_torch_reference_on_timm_names(tmp_path):
    """The timm forward (conv2d NCHW, (out, in) linears, exact GELU, fused qkv) in PyTorch on the same tensors."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    w = flax_checkpoint(nh=4, D=12, token=True)
    t = timm_tensors(w)
    save_safetensors(t, tmp_path / "m.safetensors")
    params, cfg = load_safetensors(tmp_path / "m.safetensors", heads=4, dtype=np.float64)
    x = images_for(w)
    T = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}
    with torch.no_grad():
        z = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), T["patch_embed.proj.weight"], T["patch_embed.proj.bias"],
                     stride=cfg.patch_size).flatten(2).transpose(1, 2)          # (B, Np, D)
        z = torch.cat([T["cls_token"].expand(z.shape[0], -1, -1), z], 1) + T["pos_embed"]
        B, N, D = z.shape
        for i in range(cfg.depth):
            p = lambda n: T[f"blocks.{i}.{n}"]
            h = F.layer_norm(z, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
            q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
            z = z + F.linear(o, p("attn.proj.weight"), p("attn.proj.bias"))
            h = F.layer_norm(z, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
            z = z + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        z = F.layer_norm(z, (D,), T["norm.weight"], T["norm.bias"], eps=1e-6)
        ref = F.linear(z[:, 0], T["head.weight"], T["head.bias"]).numpy()
    np.testing.assert_allclose(vit_forward(params, x, cfg)[0], ref, rtol=0, atol=1e-10)


def test_timm_model_cross_check(tmp_path):
    """When timm is installed: its npz loader and its state dict agree with ours (skipped otherwise)."""
    torch = pytest.importorskip("torch")
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    w = flax_checkpoint(nh=4, D=16, M=24)
    path = save(tmp_path, {k: v.astype(np.float32) for k, v in w.items()})
    params, cfg = load_npz(path, dtype=np.float64, gelu="exact")
    m = timm_vit.VisionTransformer(img_size=6, patch_size=2, embed_dim=16, depth=2, num_heads=4, mlp_ratio=1.5,
                                   num_classes=5).double().eval()
    with torch.no_grad():
        timm_vit._load_weights(m, str(path))
        x = images_for(w)
        ref = m(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        save_safetensors({k: v.numpy() for k, v in m.state_dict().items()}, tmp_path / "m.safetensors")
    np.testing.assert_allclose(vit_forward(params, x, cfg)[0], ref, rtol=0, atol=1e-10)
    assert params_equal(load_safetensors(tmp_path / "m.safetensors", heads=4, dtype=np.float64).params, params)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch, resizing, heads, images, labels

def test_load_pretrained_dispatches_on_content(tmp_path):
    w = flax_checkpoint()
    npz = save(tmp_path, w, "weights.bin")
    save_safetensors(timm_tensors(w), tmp_path / "model.weights")
    assert checkpoint_format(npz) == "npz" and checkpoint_format(tmp_path / "model.weights") == "safetensors"
    a = load_pretrained(npz, dtype=np.float64)
    b = load_pretrained(tmp_path / "model.weights", heads=2, gelu="tanh", dtype=np.float64)
    assert isinstance(a, Loaded) and (a.source, b.source) == ("npz", "safetensors")
    assert a.cfg == b.cfg and params_equal(a.params, b.params)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither"):
        load_pretrained(tmp_path / "x.txt")


def test_resize_for_image_size(tmp_path, device):
    xp = get_backend(device)
    params, cfg = load_npz(save(tmp_path, flax_checkpoint()))
    params = to_device(params, device)
    same, cfg_same = resize_model(params, cfg, 6)
    assert cfg_same == cfg and same["pos_embed"] is params["pos_embed"]
    big, cfg_big = resize_model(params, cfg, 10)                  # grid 3x3 -> 5x5
    assert cfg_big.grid == (5, 5) and cfg_big.image_size == 10 and big["pos_embed"].shape == (1, 26, 8)
    old, new = to_numpy(params["pos_embed"])[0], to_numpy(big["pos_embed"])[0]
    assert np.array_equal(new[0], old[0])                                   # class token carried over
    g_old, g_new = old[1:].reshape(3, 3, 8), new[1:].reshape(5, 5, 8)
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, 4): (0, 2), (4, 0): (2, 0), (4, 4): (2, 2), (2, 2): (1, 1)}.items():
        np.testing.assert_allclose(g_new[i, j], g_old[a, b], atol=1e-6)       # corner-aligned: these coincide
    np.testing.assert_allclose(g_new[1, 0], (g_old[0, 0] + g_old[1, 0]) / 2, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(big["pos_embed"]),
                                  to_numpy(resample_pos_embed(params["pos_embed"], (5, 5), (3, 3), 1, "linear")))
    x = xp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 10, 10, 3)).astype(np.float32))
    assert vit_forward(big, x, cfg_big)[0].shape == (1, 5)
    _, cfg_rect = resize_model(params, cfg, (4, 8))
    assert cfg_rect.grid == (2, 4)


def test_replace_head_drops_pre_logits(tmp_path, device):
    params, cfg = load_npz(save(tmp_path, flax_checkpoint(rep=6)))
    params = to_device(params, device)
    new, new_cfg = new_head(params, cfg, 3)
    assert new_cfg.num_classes == 3 and new_cfg.representation_size == 0 and "pre_logits" not in new
    assert new["head"]["w"].shape == (8, 3) and not to_numpy(new["head"]["w"]).any()
    assert new["head"]["w"].dtype == np.float32 and new["blocks"] is params["blocks"]


def test_gpu_forward_matches_cpu(tmp_path, device):
    if device == "cpu":
        pytest.skip("compares the GPU with the CPU (on the CPU it would compare the CPU with itself)")
    w = flax_checkpoint(rep=6)
    params, cfg = load_npz(save(tmp_path, w))
    x = images_for(w).astype(np.float32)
    cpu, _ = vit_forward(params, x, cfg)
    dev = to_device(params, device)
    got, _ = vit_forward(dev, to_device(x, device), cfg)
    np.testing.assert_allclose(to_numpy(got), cpu, rtol=1e-4, atol=1e-4)


def test_read_labels(tmp_path):
    (tmp_path / "l.txt").write_text("tench\ngoldfish \n great white shark\n\n")
    assert read_labels(tmp_path / "l.txt") == ["tench", "goldfish", "great white shark"]
    assert read_labels(tmp_path / "l.txt", num_classes=3)[2] == "great white shark"
    with pytest.raises(ValueError, match="3 labels, but the model has 5 classes"):
        read_labels(tmp_path / "l.txt", num_classes=5)
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_labels(tmp_path / "gap.txt")
