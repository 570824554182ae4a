"""Pretrained ViTs: load and export the original ViT .npz checkpoints and timm's .safetensors files.

The paper's weights are plain NumPy archives written by the original JAX/Flax code, one array per Flax parameter
path; timm's weights on the Hugging Face hub are .safetensors files of PyTorch tensors (the file format:
minivit/safetensors.py). Both are read with NumPy alone, mapped to minivit's parameter tree through one explicit
name table per format, and checked entry by entry: every file key must be used, every parameter found, every
shape as the inferred config expects.

Conventions the original weights need (and what the config returned by the loaders says):
    GELU         tanh approximation in the original Flax code (`nn.gelu`'s default), the exact erf form in timm
                 (PyTorch's `nn.GELU`); `load_npz` defaults to gelu='tanh', `load_safetensors` to 'exact'.
    LayerNorm    eps 1e-6 in both.
    pixels       scaled to [-1, 1]: (x - 127.5) / 127.5, not ImageNet mean/std (minivit.data.transforms.normalize's default). Most timm
                 ViT weights converted from the paper's files (augreg, orig_in21k) use the same 0.5/0.5 scaling;
                 DeiT weights (the same timm names) expect ImageNet mean/std instead.
    pre-logits   the original ImageNet-21k checkpoints end with a dense + tanh layer before the head (`pre_logits`,
                 minivit's `representation_size`); fine-tuned checkpoints have none.
    pooling      a file with a class token (`cls`, timm `cls_token`) is a 'token' model; one without is 'gap' (the
                 original code's mean of the patch tokens after the final LayerNorm).

The original layout (ViT-B/16 shapes, Flax module names; kernels are (in, out)):
    embedding/kernel (16, 16, 3, 768)  embedding/bias (768,)         the patch embedding, a stride-16 convolution
    cls (1, 1, 768)                     Transformer/posembed_input/pos_embedding (1, 197, 768)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias} (768,)
        .../MultiHeadDotProductAttention_1/{query, key, value}/kernel (768, 12, 64), bias (12, 64)
        .../MultiHeadDotProductAttention_1/out/kernel (12, 64, 768), bias (768,)
        .../LayerNorm_2/{scale, bias}; .../MlpBlock_3/Dense_0/{kernel (768, 3072), bias}, Dense_1 (3072, 768)
    Transformer/encoder_norm/{scale, bias}; pre_logits/{kernel, bias} (optional); head/{kernel (768, K), bias}
Some files put every key under a prefix (`opt/target/` in checkpoints saved with the optimizer): the prefix is
whatever precedes `embedding/kernel`, and keys outside it (optimizer state) are ignored and listed in
`Loaded.ignored`. big_vision's layout (`params/`, `pos_embedding` at the top, stacked 'scanned' blocks) is not
supported and is named as such in the error.

timm's names (linear weights are (out, in), the patch embedding a PyTorch conv weight (D, C, P, P)):
    patch_embed.proj.{weight, bias}, cls_token, pos_embed, blocks.{i}.norm1.*, blocks.{i}.attn.qkv.{weight (3D, D),
    bias}, blocks.{i}.attn.proj.*, blocks.{i}.norm2.*, blocks.{i}.mlp.fc1.*, blocks.{i}.mlp.fc2.*, norm.*,
    head.{weight (K, D), bias}, and older timm's pre_logits.fc.* (dense + tanh). A timm state dict does not say the
    number of heads (qkv is (3D, D) whatever it is): it comes from `heads=`, else from the file's
    `__metadata__["minivit.heads"]` (written by `export_safetensors`), else from the paper's sizes by width
    (192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16). Models minivit cannot represent fail with their keys named:
    timm 'avg' pooling with `fc_norm` (LayerNorm after pooling), register tokens, layer scale, `norm_pre`.

Config inference (both formats, from shapes alone):
    patch size P, channels C, width D     the patch-embedding kernel (P, P, C, D) / conv weight (D, C, P, P)
    pooling                               'token' when there is a class token, else 'gap'
    patch grid, image size                N - n_prefix positions in the position embedding: a square grid
                                          g x g and image size g * P, unless `grid=(gh, gw)` says otherwise
    depth                                 the number of encoder blocks (indices 0 .. L-1)
    heads                                 npz: the query kernel (D, nh, hs); timm: see above
    MLP width M                           the first MLP kernel
    representation_size                   the pre-logits kernel's output width, 0 without one
    classes K                             the head's output width, or `num_classes=` when the head is missing and
                                          allowed to be (`allow_missing=("head",)`: a zero head, as the original
                                          code's fine-tuning head)

Where the official files live (no network here; a user with internet runs):
    wget https://storage.googleapis.com/vit_models/imagenet21k%2Bimagenet2012/ViT-B_16-224.npz   # ImageNet-1k, 224
    wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz   # 21k pre-trained, pre-logits, K 21843
    wget https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k/resolve/main/model.safetensors
Files in the original layout (the paper's ViT-B/16, B/32, L/16, L/32, H/14 and the AugReg ones under
gs://vit_models/augreg/) load; the R50+ViT hybrids do not (their ResNet keys are reported as unexpected).
"""
import math
import os
import re
import struct
import zipfile
import zlib
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np

from minivit.backend import to_numpy
from minivit.checkpoint import CheckpointError   # one error type for every checkpoint format
from minivit.config import CONFIGS, ViTConfig, param_shapes
from minivit.fileio import atomic_save_npz
from minivit.model import check_params
from minivit.safetensors import bf16_to_f32, read_safetensors, save_safetensors
from minivit.tree import flatten, unflatten


def _param_shapes_flat(cfg):
    """{minivit dotted name: shape} for cfg, in parameter order."""
    return flatten(param_shapes(cfg), is_leaf=lambda v: isinstance(v, tuple))


# The paper's sizes: width D -> heads, for timm files (which do not store the number of heads).
PAPER_HEADS = {c.width: c.heads for name, c in CONFIGS.items() if name.startswith("vit-")}

ALLOW_MISSING = ("head",)   # what may be missing from a file: the head (filled with zeros, K from num_classes)




@dataclass(frozen=True)
class Loaded:
    """What a loader returns; unpacks as `params, cfg = load_npz(path)`.

    params   minivit's parameter tree (NumPy arrays of the requested dtype)
    cfg      the ViTConfig inferred from the shapes
    filled   minivit names that were missing from the file and allowed to be (set to zeros)
    ignored  file keys outside the model prefix (e.g. optimizer state under `opt/state/`), not read
    prefix   the prefix every model key had in the file ('' or e.g. 'opt/target/')
    source   'npz' or 'safetensors'
    metadata a .safetensors file's __metadata__ ({} for npz)
    """
    params: dict
    cfg: ViTConfig
    filled: tuple = ()
    ignored: tuple = ()
    prefix: str = ""
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.params, self.cfg))


# ----------------------------------------------------------------------------------------------------------------
# The name tables: one row per minivit parameter.
#
#   name    minivit's dotted name (as tree.flatten writes it)
#   keys    the file key(s) it comes from (three for the fused qkv: the original stores q, k, v apart)
#   shapes  the file shape of each key
#   kind    how the file arrays become the minivit array (and back, for export):
#           reshape  same numbers, same order: a.reshape(shape) (identity when the shapes agree)
#           concat   q, k, v each reshaped to (..., D), concatenated on the last axis -> [q | k | v]
#           linear   PyTorch (out, in) -> (in, out): a.T
#           conv     PyTorch conv (D, C, P, P) -> (P, P, C, D) -> (P*P*C, D): rows in (row, col, channel) order

Row = namedtuple("Row", "name keys shapes kind")


def npz_table(cfg):
    """The original ViT layout for `cfg`: a list of Rows, in minivit's parameter order."""
    D, M, P, C, nh, hs = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.channels, cfg.heads, cfg.head_dim
    R, K = cfg.representation_size, cfg.num_classes
    one = lambda name, key, shape: Row(name, (key,), (shape,), "reshape")
    rows = [one("patch_embed.w", "embedding/kernel", (P, P, C, D)),       # (P, P, C, D) -> (P*P*C, D)
            one("patch_embed.b", "embedding/bias", (D,))]
    if cfg.n_prefix:
        rows.append(one("cls_token", "cls", (1, 1, D)))
    rows.append(one("pos_embed", "Transformer/posembed_input/pos_embedding", (1, cfg.seq_len, D)))
    for i in range(cfg.depth):
        b, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        a = t + "MultiHeadDotProductAttention_1/"
        rows += [
            one(b + "norm1.w", t + "LayerNorm_0/scale", (D,)),
            one(b + "norm1.b", t + "LayerNorm_0/bias", (D,)),
            Row(b + "attn.qkv_w", tuple(a + n + "/kernel" for n in ("query", "key", "value")),
                ((D, nh, hs),) * 3, "concat"),                                # 3 x (D, nh, hs) -> (D, 3D)
            Row(b + "attn.qkv_b", tuple(a + n + "/bias" for n in ("query", "key", "value")),
                ((nh, hs),) * 3, "concat"),                                   # 3 x (nh, hs) -> (3D,)
            one(b + "attn.proj_w", a + "out/kernel", (nh, hs, D)),           # (nh, hs, D) -> (D, D)
            one(b + "attn.proj_b", a + "out/bias", (D,)),
            one(b + "norm2.w", t + "LayerNorm_2/scale", (D,)),
            one(b + "norm2.b", t + "LayerNorm_2/bias", (D,)),
            one(b + "mlp.fc1_w", t + "MlpBlock_3/Dense_0/kernel", (D, M)),
            one(b + "mlp.fc1_b", t + "MlpBlock_3/Dense_0/bias", (M,)),
            one(b + "mlp.fc2_w", t + "MlpBlock_3/Dense_1/kernel", (M, D)),
            one(b + "mlp.fc2_b", t + "MlpBlock_3/Dense_1/bias", (D,)),
        ]
    rows += [one("norm.w", "Transformer/encoder_norm/scale", (D,)),
             one("norm.b", "Transformer/encoder_norm/bias", (D,))]
    if R:
        rows += [one("pre_logits.w", "pre_logits/kernel", (D, R)), one("pre_logits.b", "pre_logits/bias", (R,))]
    rows += [one("head.w", "head/kernel", (R or D, K)), one("head.b", "head/bias", (K,))]
    return rows


def timm_table(cfg):
    """timm's VisionTransformer state dict for `cfg`: a list of Rows, in minivit's parameter order."""
    D, M, P, C = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.channels
    R, K = cfg.representation_size, cfg.num_classes
    same = lambda name, key, shape: Row(name, (key,), (shape,), "reshape")
    lin = lambda name, key, shape: Row(name, (key,), (shape,), "linear")   # shape: (out, in)
    rows = [Row("patch_embed.w", ("patch_embed.proj.weight",), ((D, C, P, P),), "conv"),
            same("patch_embed.b", "patch_embed.proj.bias", (D,))]
    if cfg.n_prefix:
        rows.append(same("cls_token", "cls_token", (1, 1, D)))
    rows.append(same("pos_embed", "pos_embed", (1, cfg.seq_len, D)))
    for i in range(cfg.depth):
        b = f"blocks.{i}."                                                  # the same in both
        rows += [
            same(b + "norm1.w", b + "norm1.weight", (D,)),
            same(b + "norm1.b", b + "norm1.bias", (D,)),
            lin(b + "attn.qkv_w", b + "attn.qkv.weight", (3 * D, D)),       # rows [q | k | v], heads in order
            same(b + "attn.qkv_b", b + "attn.qkv.bias", (3 * D,)),
            lin(b + "attn.proj_w", b + "attn.proj.weight", (D, D)),
            same(b + "attn.proj_b", b + "attn.proj.bias", (D,)),
            same(b + "norm2.w", b + "norm2.weight", (D,)),
            same(b + "norm2.b", b + "norm2.bias", (D,)),
            lin(b + "mlp.fc1_w", b + "mlp.fc1.weight", (M, D)),
            same(b + "mlp.fc1_b", b + "mlp.fc1.bias", (M,)),
            lin(b + "mlp.fc2_w", b + "mlp.fc2.weight", (D, M)),
            same(b + "mlp.fc2_b", b + "mlp.fc2.bias", (D,)),
        ]
    rows += [same("norm.w", "norm.weight", (D,)), same("norm.b", "norm.bias", (D,))]
    if R:
        rows += [lin("pre_logits.w", "pre_logits.fc.weight", (R, D)), same("pre_logits.b", "pre_logits.fc.bias", (R,))]
    rows += [lin("head.w", "head.weight", (K, R or D)), same("head.b", "head.bias", (K,))]
    return rows


def _to_minivit(row, arrays, shape):
    """The file arrays of one row -> the minivit array of `shape` (a view where possible)."""
    if row.kind == "reshape":
        return arrays[0].reshape(shape)
    if row.kind == "concat":
        return np.concatenate([a.reshape(*shape[:-1], -1) for a in arrays], axis=-1)  # [q | k | v]
    if row.kind == "linear":
        return arrays[0].T                                                  # (out, in) -> (in, out)
    if row.kind == "conv":
        return arrays[0].transpose(2, 3, 1, 0).reshape(shape)              # (D, C, P, P) -> (P, P, C, D) -> (PPC, D)
    raise AssertionError(row.kind)


def _from_minivit(row, x):
    """The minivit array of one row -> the list of file arrays (the inverse of `_to_minivit`)."""
    if row.kind == "reshape":
        return [x.reshape(row.shapes[0])]
    if row.kind == "concat":
        return [p.reshape(s) for p, s in zip(np.split(x, len(row.keys), axis=-1), row.shapes)]
    if row.kind == "linear":
        return [x.T]
    if row.kind == "conv":
        D, C, P, _ = row.shapes[0]
        return [x.reshape(P, P, C, D).transpose(3, 2, 0, 1)]               # (PPC, D) -> (D, C, P, P)
    raise AssertionError(row.kind)


# ----------------------------------------------------------------------------------------------------------------
# Config inference

def _shape(shapes, key, ndim, why, path):
    """The shape of `key` (rank `ndim`), else a CheckpointError saying which key the inference needs."""
    if key not in shapes:
        some = ", ".join(sorted(shapes)[:8])
        raise CheckpointError(f"{path}: missing key {key!r} (needed to infer {why}); the file's keys begin: {some}",
                              path, missing=[key])
    s = tuple(shapes[key])
    if len(s) != ndim:
        raise CheckpointError(f"{path}: key {key!r} has shape {s}, expected rank {ndim} (to infer {why})", path)
    return s


def _grid_and_size(n_grid, P, grid, key, n_total, path):
    """Grid positions in the position embedding -> image size: a square g x g grid (g * P), or the caller's grid."""
    if grid is not None:
        gh, gw = (int(g) for g in grid)
        if gh * gw != n_grid:
            raise CheckpointError(f"{path}: grid {gh}x{gw} = {gh * gw} positions, but {key!r} has {n_grid} grid "
                                  f"positions (N = {n_total})", path)
        return gh * P if gh == gw else (gh * P, gw * P)
    g = math.isqrt(max(n_grid, 0))
    if n_grid < 1 or g * g != n_grid:
        raise CheckpointError(f"{path}: {key!r} has {n_total} positions; {n_grid} grid positions do not make a "
                              f"square grid: pass grid=(gh, gw)", path)
    return g * P


def _depth(shapes, pattern):
    """1 + the largest block index in the keys (a gap in the indices shows up later as missing keys)."""
    found = [int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m]
    return max(found) + 1 if found else 0


def _make_config(path, **fields):
    try:
        return ViTConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: the shapes give an invalid config: {e}", path) from e


def _check_classes(shapes, head_key, axis, num_classes, path):
    """K from the head kernel (axis 1 of (in, K), axis 0 of timm's (K, in)), else the caller's num_classes."""
    if head_key in shapes:
        K = _shape(shapes, head_key, 2, "the number of classes", path)[axis]
        if num_classes is not None and num_classes != K:
            raise CheckpointError(f"{path}: num_classes={num_classes} but {head_key!r} has {K} classes (shape "
                                  f"{tuple(shapes[head_key])}); load it, then minivit.finetune.new_head(params, cfg, "
                                  f"{num_classes})", path)
        return K
    if num_classes is None:
        raise CheckpointError(f"{path}: missing key {head_key!r}: pass allow_missing=('head',) and num_classes=K "
                              f"for a zero head of K classes", path, missing=[head_key])
    return num_classes


def infer_npz_config(shapes, grid=None, num_classes=None, heads=None, gelu="tanh", path="<npz>"):
    """{file key: shape} in the original layout (prefix removed) -> ViTConfig. Rules in the module docstring."""
    P, P2, C, D = _shape(shapes, "embedding/kernel", 4, "patch size, channels and width", path)
    if P != P2:
        raise CheckpointError(f"{path}: 'embedding/kernel' has shape {(P, P2, C, D)}: minivit needs square patches",
                              path)
    n_prefix = 1 if "cls" in shapes else 0
    pos_key = "Transformer/posembed_input/pos_embedding"
    N = _shape(shapes, pos_key, 3, "the patch grid", path)[1]
    size = _grid_and_size(N - n_prefix, P, grid, pos_key, N, path)
    depth = _depth(shapes, r"Transformer/encoderblock_(\d+)/")
    q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    nh = _shape(shapes, q, 3, "the number of heads", path)[1]
    if heads is not None and heads != nh:
        raise CheckpointError(f"{path}: heads={heads} but {q!r} has shape {tuple(shapes[q])}: {nh} heads", path)
    M = _shape(shapes, "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", 2, "the MLP width", path)[1]
    R = _shape(shapes, "pre_logits/kernel", 2, "the pre-logits width", path)[1] if "pre_logits/kernel" in shapes else 0
    K = _check_classes(shapes, "head/kernel", 1, num_classes, path)
    return _make_config(path, image_size=size, patch_size=P, channels=C, num_classes=K, width=D, depth=depth,
                        heads=nh, mlp_dim=M, pooling="token" if n_prefix else "gap", representation_size=R,
                        gelu=gelu, ln_eps=1e-6)


def infer_timm_config(shapes, grid=None, num_classes=None, heads=None, gelu="exact", metadata=None,
                      path="<safetensors>"):
    """{file key: shape} with timm's names -> ViTConfig. Rules in the module docstring."""
    D, C, P, P2 = _shape(shapes, "patch_embed.proj.weight", 4, "patch size, channels and width", path)
    if P != P2:
        raise CheckpointError(f"{path}: 'patch_embed.proj.weight' has shape {(D, C, P, P2)}: minivit needs square "
                              f"patches", path)
    n_prefix = 1 if "cls_token" in shapes else 0
    N = _shape(shapes, "pos_embed", 3, "the patch grid", path)[1]
    size = _grid_and_size(N - n_prefix, P, grid, "pos_embed", N, path)
    depth = _depth(shapes, r"blocks\.(\d+)\.")
    if heads is None and metadata and "minivit.heads" in metadata:
        heads = int(metadata["minivit.heads"])
    if heads is None:
        if D not in PAPER_HEADS:
            raise CheckpointError(f"{path}: a timm file does not store the number of heads and width {D} is none "
                                  f"of the paper's ({sorted(PAPER_HEADS)}): pass heads=", path)
        heads = PAPER_HEADS[D]
    M = _shape(shapes, "blocks.0.mlp.fc1.weight", 2, "the MLP width", path)[0]
    R = _shape(shapes, "pre_logits.fc.weight", 2, "the pre-logits width", path)[0] if "pre_logits.fc.weight" in shapes else 0
    K = _check_classes(shapes, "head.weight", 0, num_classes, path)
    return _make_config(path, image_size=size, patch_size=P, channels=C, num_classes=K, width=D, depth=depth,
                        heads=heads, mlp_dim=M, pooling="token" if n_prefix else "gap", representation_size=R,
                        gelu=gelu, ln_eps=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Mapping file arrays to minivit parameters

def _listing(keys, limit=12):
    keys = list(keys)
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


_UNSUPPORTED_HINTS = {  # a key that tells what kind of model minivit cannot represent
    "fc_norm.weight": "timm 'avg' pooling with fc_norm (a LayerNorm after pooling; minivit normalizes before)",
    "reg_token": "register tokens",
    "norm_pre.weight": "a LayerNorm before the blocks (CLIP-style)",
    "blocks.0.ls1.gamma": "layer scale",
    "conv_root/kernel": "an R50+ViT hybrid (ResNet stem)",
}


def _convert(arrays, table, cfg, path, allow_missing, dtype):
    """{file key: array} -> (params tree, filled names): every key used, every row found, every shape checked."""
    allow_missing = (allow_missing,) if isinstance(allow_missing, str) else tuple(allow_missing)
    bad = [n for n in allow_missing if n not in ALLOW_MISSING]
    if bad:
        raise ValueError(f"allow_missing may name {ALLOW_MISSING}, got {bad}")
    allowed = lambda name: name.split(".")[0] in allow_missing
    wanted = {k for row in table for k in row.keys}
    missing = [k for row in table for k in row.keys if k not in arrays and not allowed(row.name)]
    unexpected = [k for k in arrays if k not in wanted]
    if missing or unexpected:
        hints = [f"{h} ({k!r})" for k, h in _UNSUPPORTED_HINTS.items() if k in unexpected]
        raise CheckpointError(
            f"{path}: the keys do not match a ViT with patch {cfg.patch_size}, width {cfg.width}, depth {cfg.depth}, "
            f"{cfg.heads} heads, MLP {cfg.mlp_dim}, {cfg.num_classes} classes, pooling {cfg.pooling!r}, "
            f"representation_size {cfg.representation_size}: "
            f"missing keys ({len(missing)}): [{_listing(missing)}]; unexpected keys ({len(unexpected)}): "
            f"[{_listing(unexpected)}]" + (f"; not supported: {'; '.join(hints)}" if hints else ""),
            path, missing=missing, unexpected=unexpected)
    mismatched = [f"{k!r}: expected {s}, found {tuple(arrays[k].shape)}" for row in table
                  for k, s in zip(row.keys, row.shapes) if k in arrays and tuple(arrays[k].shape) != s]
    if mismatched:
        raise CheckpointError(f"{path}: shape mismatch for {len(mismatched)} key(s): " + "; ".join(mismatched[:12]),
                              path)
    shapes = _param_shapes_flat(cfg)
    flat, filled = {}, []
    by_name = {row.name: row for row in table}
    assert list(by_name) == list(shapes), "name table out of step with param_shapes"
    for name, shape in shapes.items():
        row = by_name[name]
        if any(k not in arrays for k in row.keys):            # allowed to be missing: the zero head
            flat[name] = np.zeros(shape, dtype=dtype)
            filled.append(name)
            continue
        for k in row.keys:
            if not np.issubdtype(arrays[k].dtype, np.floating):
                raise CheckpointError(f"{path}: key {k!r} has dtype {arrays[k].dtype}, expected floating point", path)
        x = _to_minivit(row, [arrays[k] for k in row.keys], shape)
        assert x.shape == shape, (name, x.shape, shape)
        flat[name] = np.ascontiguousarray(x, dtype=dtype)
    return unflatten(flat), tuple(filled)


def _split_prefix(keys, anchor, prefix, path):
    """(prefix, keys inside it, keys outside): the prefix is what precedes `anchor` in the file."""
    if prefix is None:
        found = [k[:-len(anchor)] for k in keys if k == anchor or (k.endswith(anchor) and k[-len(anchor) - 1] in "/.")]
        if not found:
            raise CheckpointError(f"{path}: no {anchor!r} key (with or without a prefix): not a ViT checkpoint in this "
                                  f"layout; the file's keys begin: {_listing(sorted(keys), 8)}", path,
                                  missing=[anchor])
        if len(found) > 1:
            raise CheckpointError(f"{path}: {anchor!r} appears under several prefixes {found}: pass prefix=", path)
        prefix = found[0]
    inside = [k for k in keys if k.startswith(prefix)]
    outside = tuple(k for k in keys if not k.startswith(prefix))
    return prefix, inside, outside


# ----------------------------------------------------------------------------------------------------------------
# Reading .npz files (.safetensors: minivit/safetensors.py)

def _check_file(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    return path


def _open_npz(path):
    """np.load(path, allow_pickle=False) as an NpzFile, else CheckpointError naming the file."""
    path = _check_file(path)
    if not zipfile.is_zipfile(path):   # (np.load would try it as a pickle and say so, which misleads)
        raise CheckpointError(f"{path}: not an .npz archive (not a zip file: truncated, or another format)", path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})", path) from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: a single .npy array, not an .npz archive of named arrays", path)
    return z


def _npz_member(z, key, path):
    """One array of an open NpzFile; 2-byte void arrays (JAX bfloat16 saved by np.savez) upcast to float32."""
    try:
        a = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CheckpointError(f"{path}: key {key!r} cannot be read ({type(e).__name__}: {e}); the file is corrupt "
                              f"or truncated", path) from e
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.fields is None:
        a = bf16_to_f32(a.view(np.uint16))
    return a


def read_npz(path):
    """path -> {key: array}: every array of an .npz file (np.load with allow_pickle=False).

    Void 2-byte arrays, as NumPy saves JAX bfloat16 arrays, are read as bfloat16 and upcast to float32. A file that
    is not an .npz archive, is truncated, or has an unreadable member raises CheckpointError naming it.
    """
    path = os.fspath(path)
    with _open_npz(path) as z:
        return {key: _npz_member(z, key, path) for key in z.files}


# ----------------------------------------------------------------------------------------------------------------
# Loading

def _check_gelu_dtype(gelu, dtype):
    if gelu not in ("tanh", "exact"):
        raise ValueError(f"gelu must be 'tanh' or 'exact', got {gelu!r}")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"dtype must be floating point, got {dtype!r}")


def _check_big_vision(keys, prefix, path):
    odd = [k for k in keys if k == prefix + "pos_embedding" or k.startswith(prefix + "Transformer/encoderblock/")]
    if odd:
        raise CheckpointError(f"{path}: big_vision layout (keys {_listing(odd, 3)}) is not supported; only the "
                              f"original ViT layout is", path, unexpected=odd)


def load_npz(path, allow_missing=(), num_classes=None, grid=None, heads=None, prefix=None, dtype=np.float32,
             gelu="tanh"):
    """An original-layout .npz checkpoint -> Loaded(params, cfg, ...) (unpacks as `params, cfg`).

    allow_missing  ("head",) lets the head be absent: a zero head of `num_classes` classes
    num_classes    needed only for a missing head (else it must agree with the file)
    grid           (gh, gw) of the position embedding, needed only when it is not square (the file does
                   not say); to run at another input size use minivit.finetune.resize_model after loading
    heads          optional: checked against the file's query kernel (accepted so that load_pretrained
                   takes the same arguments for both formats)
    prefix         None finds it (what precedes 'embedding/kernel'); keys outside it are ignored
    dtype, gelu    the parameters' dtype; the GELU form (the original code: 'tanh')
    Raises FileNotFoundError, or CheckpointError (a ValueError) naming the file and the keys at fault.
    """
    _check_gelu_dtype(gelu, dtype)
    path = os.fspath(path)
    with _open_npz(path) as z:                                              # keys outside the prefix are not read
        prefix, inside, ignored = _split_prefix(list(z.files), "embedding/kernel", prefix, path)
        _check_big_vision(inside, prefix, path)
        arrays = {k[len(prefix):]: _npz_member(z, k, path) for k in inside}
    shapes = {k: a.shape for k, a in arrays.items()}
    cfg = infer_npz_config(shapes, grid, num_classes, heads, gelu, path)
    params, filled = _convert(arrays, npz_table(cfg), cfg, path, allow_missing, dtype)
    return Loaded(params, cfg, filled, ignored, prefix, "npz")


def load_safetensors(path, allow_missing=(), num_classes=None, grid=None, heads=None, prefix=None,
                     dtype=np.float32, gelu="exact"):
    """A timm ViT .safetensors file -> Loaded(params, cfg, ...) (unpacks as `params, cfg`).

    Arguments as `load_npz`; `heads` is needed when the width is not one of the paper's and the file's metadata
    does not say (see the module docstring); gelu defaults to 'exact', timm's convention. The prefix is what
    precedes 'patch_embed.proj.weight' (e.g. 'module.'), normally ''.
    """
    _check_gelu_dtype(gelu, dtype)
    path = os.fspath(path)
    arrays, metadata = read_safetensors(path)
    prefix, inside, ignored = _split_prefix(list(arrays), "patch_embed.proj.weight", prefix, path)
    arrays = {k[len(prefix):]: arrays[k] for k in inside}
    shapes = {k: a.shape for k, a in arrays.items()}
    cfg = infer_timm_config(shapes, grid, num_classes, heads, gelu, metadata, path)
    params, filled = _convert(arrays, timm_table(cfg), cfg, path, allow_missing, dtype)
    return Loaded(params, cfg, filled, ignored, prefix, "safetensors", metadata)


def checkpoint_format(path):
    """'npz' (zip magic 'PK' or the extension) or 'safetensors' (the extension or a plausible header), else
    CheckpointError."""
    path = _check_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or path.endswith(".npz"):
        return "npz"
    if path.endswith(".safetensors"):
        return "safetensors"
    if len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path}: neither an .npz archive nor a .safetensors file", path)


def load_pretrained(path, **kwargs):
    """load_npz or load_safetensors, chosen by `checkpoint_format`; keyword arguments as theirs."""
    fmt = checkpoint_format(path)
    return (load_npz if fmt == "npz" else load_safetensors)(path, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Export

def _file_arrays(params, cfg, table, prefix, dtype):
    """minivit params -> {file key: array} through `table` (the rows read backwards)."""
    params = to_numpy(params)
    check_params(params, cfg)
    flat = flatten(params)
    out = {}
    for row in table:
        for key, a in zip(row.keys, _from_minivit(row, flat[row.name])):
            out[prefix + key] = np.ascontiguousarray(a, dtype=dtype)
    return out


def export_npz(params, cfg, path, prefix="", dtype=np.float32):
    """Write minivit params in the original ViT layout (uncompressed .npz, atomically).

    The file opens in the original code and in timm's npz loader. The layout has no field for the GELU form or the
    image size: a model trained with gelu='exact' is loaded back with load_npz(..., gelu='exact'), and a
    non-square model with grid=(gh, gw).
    """
    atomic_save_npz(path, _file_arrays(params, cfg, npz_table(cfg), prefix, dtype))


def export_safetensors(params, cfg, path, dtype=np.float32):
    """Write minivit params with timm's names as .safetensors (metadata: format 'pt', minivit.heads).

    timm loads it into vit_*(num_classes=K) for a token model, or (class_token=False, global_pool='avg',
    fc_norm=False) for a 'gap' one; timm computes GELU exactly.
    """
    tensors = _file_arrays(params, cfg, timm_table(cfg), "", dtype)
    save_safetensors(tensors, path, {"format": "pt", "minivit.heads": str(cfg.heads)})
