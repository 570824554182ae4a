"""Lesson 15: loading a real pretrained ViT from the original .npz layout.

Goal: read the paper's released weights (the google-research/vision_transformer .npz files) into minivit, see how
each file array becomes a minivit parameter, and check that nothing is lost on the way in or out.

The format. The original JAX/Flax code saves its parameters as a plain NumPy .npz archive: one array per Flax
parameter path, kernels stored (in, out). For ViT-B/16:
    embedding/kernel (16, 16, 3, 768), embedding/bias       the patch embedding is a stride-16 convolution
    cls (1, 1, 768)                                          the class token
    Transformer/posembed_input/pos_embedding (1, 197, 768)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}                      norm1
        .../MultiHeadDotProductAttention_1/{query, key, value}/kernel (768, 12, 64), bias (12, 64)
        .../MultiHeadDotProductAttention_1/out/kernel (12, 64, 768), bias (768,)
        .../LayerNorm_2/{scale, bias}                                            norm2
        .../MlpBlock_3/Dense_0/{kernel (768, 3072), bias}, .../Dense_1/{kernel (3072, 768), bias}
    Transformer/encoder_norm/{scale, bias};  pre_logits/{kernel, bias} (21k files only);  head/{kernel, bias}
minivit.pretrained.load_npz maps these to minivit's tree with one explicit name table (npz_table): reshapes for
most rows (the conv kernel (P, P, C, D) -> (P*P*C, D) in patchify's (row, col, channel) order, (nh, hs, D) -> (D, D)),
and the three separate q, k, v projections concatenated into minivit's fused qkv_w (D, 3D) = [q | k | v]. The
config (patch size, width, depth, heads, MLP width, classes, grid, pooling) is inferred from the shapes alone.
Pixels go in scaled to [-1, 1] and GELU is the tanh form (the original code's), both load_npz's defaults.

Without --npz the lesson writes such a file itself, by hand, from lesson 10's trained model (or a random small one
when lesson 10 has not run), with the Flax key names above, and checks: every parameter comes back exactly; the
file's conv kernel applied as a convolution gives the same patch tokens; the logits are the same; export_npz
writes back exactly the file's arrays (a round trip); a file saved with its optimizer (keys under 'opt/target/')
loads too, the rest listed as ignored. With --npz PATH it loads a real file (e.g. ViT-B_16-224.npz, see
minivit/pretrained.py for where to get it), prints what it inferred, checks the round trip, and classifies --image
(default: a drawn shape) with class names from --labels (one per line) when given.

Run:   python lessons/15_pretrained_npz.py [--quick] [--out DIR] [--npz PATH [--image IMG] [--labels TXT]]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: the same). A ViT-B/16 file (346 MB):
       about 10 s, most of it writing and reading the round-trip copy.

You should see (the built file, from lesson 10's model):
    wrote lessons/out/15_vit_original_layout.npz: 56 arrays with the Flax key names
    inferred: image 32, patch 8, width 64, depth 3, heads 4, MLP 128, 10 classes, pooling 'token', gelu 'tanh'
    the name table (44 rows), e.g. blocks.0.attn.qkv_w <- .../{query,key,value}/kernel 3 x (64, 4, 16) (concat)
    every parameter equal to the source (max |difference| 0); conv on the file kernel = patch tokens (~1e-6)
    logits equal; export_npz round trip: the same 56 arrays, bit for bit; 'opt/target/' prefix: 1 key ignored
    a drawn triangle: top-5 with lesson 10's model, e.g. triangle 28%, square 26%, star 21%, ...
and lessons/out/15_pretrained_npz.png: the input image and the top-5 class probabilities.
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.checkpoint import load_checkpoint
from minivit.config import get_config
from minivit.data.images import load_image
from minivit.data.shapes import CLASSES, render_shapes, resize_images
from minivit.data.transforms import normalize
from minivit.draw import INK, PALETTE, font, save_png
from minivit.inference import read_labels
from minivit.layers import patch_embed_forward
from minivit.model import init_params, vit_forward
from minivit.pretrained import export_npz, load_npz, npz_table, read_npz
from minivit.tree import flatten


def flax_arrays(params, cfg):
    """minivit params -> {Flax key: array}: the original layout written out by hand (the reference that
    minivit.pretrained's name table is checked against)."""
    D, nh, hs, P, C = cfg.width, cfg.heads, cfg.head_dim, cfg.patch_size, cfg.channels
    f = {"embedding/kernel": params["patch_embed"]["w"].reshape(P, P, C, D),     # rows (row, col, channel)
         "embedding/bias": params["patch_embed"]["b"],
         "cls": params["cls_token"],
         "Transformer/posembed_input/pos_embedding": params["pos_embed"]}
    for i, b in enumerate(params["blocks"]):
        t = f"Transformer/encoderblock_{i}/"
        a = t + "MultiHeadDotProductAttention_1/"
        f[t + "LayerNorm_0/scale"], f[t + "LayerNorm_0/bias"] = b["norm1"]["w"], b["norm1"]["b"]
        for j, name in enumerate(("query", "key", "value")):                    # qkv_w columns: [q | k | v]
            f[a + name + "/kernel"] = b["attn"]["qkv_w"][:, j * D:(j + 1) * D].reshape(D, nh, hs)
            f[a + name + "/bias"] = b["attn"]["qkv_b"][j * D:(j + 1) * D].reshape(nh, hs)
        f[a + "out/kernel"] = b["attn"]["proj_w"].reshape(nh, hs, D)
        f[a + "out/bias"] = b["attn"]["proj_b"]
        f[t + "LayerNorm_2/scale"], f[t + "LayerNorm_2/bias"] = b["norm2"]["w"], b["norm2"]["b"]
        f[t + "MlpBlock_3/Dense_0/kernel"], f[t + "MlpBlock_3/Dense_0/bias"] = b["mlp"]["fc1_w"], b["mlp"]["fc1_b"]
        f[t + "MlpBlock_3/Dense_1/kernel"], f[t + "MlpBlock_3/Dense_1/bias"] = b["mlp"]["fc2_w"], b["mlp"]["fc2_b"]
    f["Transformer/encoder_norm/scale"], f["Transformer/encoder_norm/bias"] = params["norm"]["w"], params["norm"]["b"]
    f["head/kernel"], f["head/bias"] = params["head"]["w"], params["head"]["b"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in f.items()}


def source_model(out_dir, seed):
    """Lesson 10's final weights and class names, else a random small model (its predictions mean nothing)."""
    ckpt = Path(out_dir) / "10_run" / "last.npz"
    if ckpt.exists():
        params, cfg, meta = load_checkpoint(ckpt)
        return params, cfg, meta.get("data", {}).get("classes", CLASSES), f"lesson 10's model ({ckpt})"
    cfg = get_config("shapes-small", patch_size=8, width=64, depth=3, heads=4, mlp_dim=128)
    params = init_params(cfg, seed=seed)
    params["head"]["w"] = np.random.default_rng(seed).normal(0, 0.5, params["head"]["w"].shape).astype(np.float32)
    return params, cfg, CLASSES, "a random model (run lesson 10 first for a trained one)"


def max_diff(a, b):
    """Largest |difference| over two parameter trees with the same names."""
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    return max(float(np.abs(fa[k].astype(np.float64) - fb[k]).max()) for k in fa)


def show_table(cfg, block_rows=True):
    rows = npz_table(cfg)
    shown = [r for r in rows if not r.name.startswith("blocks.") or (block_rows and r.name.startswith("blocks.0."))]
    print(f"the name table ({len(rows)} rows; the ones outside blocks and block 0's):")
    for r in shown:
        keys = r.keys[0] if len(r.keys) == 1 else r.keys[0].replace("query", "{query,key,value}")
        shapes = str(r.shapes[0]) if len(r.shapes) == 1 else f"3 x {r.shapes[0]}"
        print(f"  {r.name:20s} <- {keys} {shapes} ({r.kind})")
    return rows



def draw_prediction(x, probs, names, title, path, k=5):
    """x (H, W, 3) in [-1, 1], probs (K,) -> PNG: the image as the model sees it, and the top-k probabilities."""
    pic = Image.fromarray(np.clip(np.rint(x * 127.5 + 127.5), 0, 255).astype(np.uint8))
    side = 224
    pic = pic.resize((side, side), Image.NEAREST if x.shape[0] < side else Image.BILINEAR)
    top = np.argsort(probs)[::-1][:k]
    labels = [str(names[c]) if len(str(names[c])) <= 32 else str(names[c])[:31] + "~" for c in top]
    label_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font(14)) for t in labels)
    bar_left, bar_w = int(side + 60 + label_w), 260
    img = Image.new("RGB", (bar_left + bar_w + 70, side + 70), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((20, 10), title, fill=INK, font=font(15))
    d.text((bar_left, 30), f"top-{k} class probabilities", fill=INK, font=font(13))
    img.paste(pic, (20, 40))
    for i, c in enumerate(top):
        y = 56 + i * 38
        d.text((bar_left - 10, y + 12), labels[i], fill=INK, font=font(14), anchor="rm")
        d.rectangle((bar_left, y, bar_left + bar_w * float(probs[c]), y + 24), fill=PALETTE[0 if i == 0 else 7])
        d.text((bar_left + bar_w * float(probs[c]) + 6, y + 12), f"{100 * probs[c]:.1f}%", fill=INK, font=font(13),
               anchor="lm")
    return save_png(img, path)


def main(quick=False, seed=0, out_dir=None, npz=None, image=None, labels=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {"real_file": npz is not None}
    if npz is None:                                                    # 1. write a file in the original layout
        src, src_cfg, names, source = source_model(out_dir, seed)
        arrays = flax_arrays(src, src_cfg)
        npz = out_dir / "15_vit_original_layout.npz"
        np.savez(npz, **arrays)                                        # uncompressed, as the original files
        print(f"source: {source}\nwrote {npz}: {len(arrays)} arrays with the Flax key names")

    t = time.perf_counter()                                            # 2. load it
    loaded = load_npz(npz)
    params, cfg = loaded
    out["load_seconds"] = time.perf_counter() - t
    print(f"load_npz: {out['load_seconds']:.2f} s; inferred: image {cfg.image_size}, patch {cfg.patch_size}, width "
          f"{cfg.width}, depth {cfg.depth}, heads {cfg.heads}, MLP {cfg.mlp_dim}, {cfg.num_classes} classes, pooling "
          f"'{cfg.pooling}', pre-logits {cfg.representation_size}, gelu '{cfg.gelu}'; prefix '{loaded.prefix}', "
          f"ignored {len(loaded.ignored)} key(s), filled {list(loaded.filled)}")
    rows = show_table(cfg)
    out.update(cfg=cfg.to_dict(), n_rows=len(rows), n_params=sum(v.size for v in flatten(params).values()))

    x_img, drawn_label = None, None
    if not out["real_file"]:                                           # 3. the checks against the source
        fields = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "num_classes", "pooling")
        assert all(getattr(cfg, f) == getattr(src_cfg, f) for f in fields)
        out["param_max_diff"] = max_diff(params, src)
        assert out["param_max_diff"] == 0.0
        P = cfg.patch_size
        drawn, drawn_label = render_shapes(1, seed + 3, 64, "test")   # (1, 64, 64, 3), (1,)
        x_img = resize_images(drawn, cfg.image_size)[0] / 127.5 - 1.0  # (H, W, 3) in [-1, 1], as lesson 10's data
        x = x_img[None].astype(np.float32)                             # (1, H, W, 3)
        tokens, _ = patch_embed_forward(x, params["patch_embed"]["w"], params["patch_embed"]["b"], P)   # (1, Np, D)
        kernel = arrays["embedding/kernel"].astype(np.float64)         # (P, P, C, D): the file's convolution
        gw = cfg.grid[1]
        conv = np.stack([np.einsum("hwc,hwcd->d", x[0, i * P:(i + 1) * P, j * P:(j + 1) * P], kernel)
                         for i in range(cfg.grid[0]) for j in range(gw)]) + arrays["embedding/bias"]   # (Np, D)
        out["conv_max_diff"] = float(np.abs(conv - tokens[0]).max())
        assert out["conv_max_diff"] < 1e-4
        (a, _), (b, _) = vit_forward(params, x, cfg), vit_forward(src, x, src_cfg)
        out["logits_max_diff"] = float(np.abs(a - b).max())
        assert out["logits_max_diff"] == 0.0
        print(f"every parameter equal to the source (max |difference| {out['param_max_diff']:.0f}); the file's "
              f"kernel as a convolution = the patch tokens ({out['conv_max_diff']:.0e}); logits equal")

    with tempfile.TemporaryDirectory() as tmp:                         # 4. round trips
        back = Path(tmp) / "export.npz"
        export_npz(params, cfg, back)
        exported, original = read_npz(back), read_npz(npz)
        model_keys = {k[len(loaded.prefix):]: v for k, v in original.items() if k.startswith(loaded.prefix)}
        assert exported.keys() == model_keys.keys()
        out["export_max_diff"] = max(float(np.abs(exported[k] - model_keys[k].astype(np.float32)).max())
                                     for k in exported)
        assert out["export_max_diff"] == 0.0
        out["reload_max_diff"] = max_diff(load_npz(back).params, params)
        assert out["reload_max_diff"] == 0.0
        print(f"export_npz round trip: the same {len(exported)} arrays, bit for bit; load_npz of the export = the "
              f"loaded parameters")
        if not out["real_file"]:
            wrapped = Path(tmp) / "with_optimizer.npz"
            np.savez(wrapped, **{"opt/target/" + k: v for k, v in arrays.items()}, **{"opt/state/step": np.array(7)})
            w = load_npz(wrapped)
            assert w.prefix == "opt/target/" and w.ignored == ("opt/state/step",) and max_diff(w.params, params) == 0
            out["prefix_ignored"] = list(w.ignored)
            print(f"a file saved with its optimizer: prefix '{w.prefix}' found, ignored {list(w.ignored)}")

    # 5. Run it on an image.
    if image is not None:
        x_img = normalize(load_image(image, cfg.image_hw, cfg.channels))   # (H, W, C) in [-1, 1]
    elif x_img is None:                                                # a real file and no --image: a drawn shape
        drawn, drawn_label = render_shapes(1, seed + 3, 64, "test")
        x_img = resize_images(drawn, cfg.image_size)[0] / 127.5 - 1.0
    if labels is not None:
        names = read_labels(labels, cfg.num_classes)
    elif out["real_file"]:
        names = [f"class {i}" for i in range(cfg.num_classes)]
    logits, _ = vit_forward(params, x_img[None].astype(np.float32), cfg)   # (1, K)
    z = logits[0].astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()            # (K,)
    top = int(probs.argmax())
    out.update(top_class=top, top_name=str(names[top]), top_prob=float(probs[top]), logits=z.tolist())
    assert math.isclose(probs.sum(), 1.0, rel_tol=1e-9)
    what = (f"a drawn {CLASSES[int(drawn_label[0])]}" if drawn_label is not None and image is None
            else Path(image).name if image is not None else "the image")
    print(f"{what}: top-5 " + ", ".join(f"{names[c]} {100 * probs[c]:.1f}%" for c in np.argsort(probs)[::-1][:5]))
    png = draw_prediction(x_img, probs, names, f"{Path(npz).name} ({cfg.image_size} px, {cfg.num_classes} classes) "
                          f"on {what}", out_dir / "15_pretrained_npz.png")
    print(f"picture: {png}")
    out.update(npz=str(npz), png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the fast version (here: the same)")
    ap.add_argument("--out", default=None, help="folder for the PNG and the built file (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--npz", default=None, help="a real checkpoint in the original layout, e.g. ViT-B_16-224.npz")
    ap.add_argument("--image", default=None, help="an image file to classify")
    ap.add_argument("--labels", default=None, help="class names, one per line (e.g. ImageNet's 1000)")
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out, npz=a.npz, image=a.image, labels=a.labels)
