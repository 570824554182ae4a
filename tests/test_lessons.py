"""Every lesson in lessons/ runs in quick mode and returns the numbers it claims.

Each lesson file is imported by path (its name starts with a digit, so it is not an importable module name) and
its `main(quick=True, seed=0, out_dir=tmp_path)` is called. The test then asserts on the returned dict, never on
printed text: specific checks for the lessons listed in CHECKS, and for any other lesson that it runs, returns a
non-empty dict and writes its pictures into out_dir only. Every lesson also follows the template of
shared/STYLE.md: a module docstring with "Run:" and "You should see", and main(quick, seed, out_dir).
"""
import ast
import importlib.util
import itertools
import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivit.checkpoint import load_checkpoint
from minivit.data import load_dataset, normalize
from minivit.data.shapes import CLASSES
from minivit.inference import predict

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
FILES = sorted(LESSONS.glob("[0-9][0-9]_*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(f"lesson_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pngs(result):
    """Every path ending in .png that a lesson returned (under 'png', a string or a list)."""
    p = result.get("png", [])
    return [Path(x) for x in ([p] if isinstance(p, (str, Path)) else p)]


# ----------------------------------------------------------------------------------------------------------------
# The lessons' own numbers.

def check_01(r):
    assert r["tokens"] == {"224/16": 196, "384/16": 576, "32/4": 64}
    assert r["patch_dims"] == {"224/16": 768, "384/16": 768, "32/4": 48}
    assert r["naive_max_diff"] == 0.0 and r["roundtrip_exact"] is True


def check_02(r):
    assert r["forward_max_diff"] < 1e-12 and r["backward_max_diff"] < 1e-10
    assert r["w_shapes"] == {"vit-ti16": (768, 192), "vit-b16": (768, 768), "vit-l16": (768, 1024),
                             "vit-h14": (588, 1280)}
    assert r["b16_patch_embed_params"] == 590_592


def check_03(r):
    assert r["no_pos_cls_change"] < 1e-12            # permutation-invariant without position embeddings
    assert r["no_pos_patch_equivariance"] < 1e-12    # and the patch outputs are permuted alike
    assert r["gap_no_pos_change"] < 1e-12
    assert r["pos_cls_change"] > 1e-3                # the position embedding breaks the symmetry


def check_04(r):
    assert max(r["linear_rel"].values()) < 1e-8 and max(r["layernorm_rel"].values()) < 1e-8
    assert set(r["linear_rel"]) == set(r["layernorm_rel"]) == {"x", "w", "b"}
    assert r["best_float64"] < 1e-9 and r["best_float32"] > 1e-6
    assert r["wrong_no_var"] > 1e-2 and r["wrong_no_w_random"] > 1e-2
    assert r["wrong_no_w_ones"] < 1e-8               # the bug that all-ones LayerNorm weights hide


def check_05(r):
    assert r["softmax_rel"] < 1e-8 and max(r["head_rel"].values()) < 1e-8
    assert r["vs_package_fwd"] < 1e-12 and r["vs_package_bwd"] < 1e-12
    sc, un = r["saturation"]["scaled"], r["saturation"]["unscaled"]
    assert r["d_list"][-1] == 1024
    assert un["max_prob"][-1] > 0.9 and max(sc["max_prob"]) < 0.4
    assert un["entropy"][-1] < 0.5 < min(sc["entropy"])
    assert un["grad_gain"][-1] < 0.01 * sc["grad_gain"][-1]


def check_06(r):
    assert r["loop_max_diff"] < 1e-12
    assert set(r["params_by_heads"].values()) == {86_567_656}
    d0, d1 = r["mean_distance_px"]
    assert d0 < d1
    assert max(r["gradcheck_rel"].values()) < 1e-8
    assert set(r["gradcheck_rel"]) == {"x", "qkv_w", "qkv_b", "proj_w", "proj_b"}


def check_07(r):
    assert abs(r["gelu_max_diff"] - 4.73e-4) < 1e-5 and abs(abs(r["gelu_max_diff_at"]) - 2.70) < 0.02
    assert max(r["gelu_rel"].values()) < 1e-8
    assert r["pieces_fwd_diff"] < 1e-12 and r["pieces_bwd_diff"] < 1e-12
    assert r["identity_exact"] is True
    assert set(r["block_rel"]) == {"tanh", "exact"} and max(r["block_rel"].values()) < 1e-8
    assert r["cosine_with"][1] > 0.9 and abs(r["cosine_without"][1]) < 0.2


def check_08(r):
    assert all(abs(v - math.log(5)) < 1e-12 for v in r["first_loss"].values())
    assert set(r["gradcheck_worst"]) == {"token", "gap", "exact GELU"}
    assert max(r["gradcheck_worst"].values()) < 1e-6
    assert r["param_counts"] == {"vit-ti16": 5_717_416, "vit-s16": 22_050_664, "vit-b16": 86_567_656,
                                 "vit-l16": 304_326_632, "vit-h14": 632_045_800}
    assert r["vit_l32"] == 306_535_400


def check_09(r):
    for prob in ("quadratic", "Rosenbrock"):
        f = r[prob]
        assert f["SGD + momentum 0.9"] < f["SGD"] and f["Adam"] < f["SGD"]
    assert np.linalg.norm(r["quadratic_end"]["AdamW (wd 0.3)"]) < np.linalg.norm(r["quadratic_end"]["Adam"])
    s = r["schedule"]
    assert abs(s["step1"] - 0.1) < 1e-12 and s["warmup_end"] == 1.0 and abs(s["half"] - 0.5) < 1e-12
    assert abs(s["end"]) < 1e-12
    n = r["noisy_final"]
    assert n["sgd cosine"] < n["sgd constant"] and n["adam cosine"] < n["adam constant"]
    assert not math.isfinite(r["clip"]["unclipped_final"]) and r["clip"]["clipped_final"] < 1e-3


def check_10(r):
    assert abs(r["first_loss"] - math.log(10)) < 1e-5                # zero head: uniform predictions, loss log K
    assert np.mean(r["losses"][-5:]) < np.mean(r["losses"][:5])      # quick mode: the loss went down
    assert r["steps"] == len(r["losses"]) == 2 * (400 // 32)         # 2 epochs of 12 batches, one on_step each
    assert r["n_params"] == 114_698
    h = r["history"]
    assert [e["epoch"] for e in h] == [1, 2] and h[-1]["test_acc"] == r["test_accuracy"]
    conf = r["confusion"]
    assert conf.shape == (10, 10) and conf.sum() == 200 and np.trace(conf) / 200 == r["test_accuracy"]
    assert Path(r["checkpoint"]).is_file() and Path(r["checkpoint"]).parent == Path(r["run_dir"])


def check_11(r):
    assert r["pos_shapes"] == ((1, 17, 64), (1, 37, 64))              # 4x4 grid + class token -> 6x6 + class token
    assert r["cls_token_kept"] is True and r["others_shared"] is True and r["corner_max_diff"] < 1e-6
    for m, R in r["R"].items():
        assert R.shape == (6, 4) and np.allclose(R.sum(axis=1), 1.0), m
    assert np.array_equal(r["R"]["linear"][0], [1, 0, 0, 0]) and np.array_equal(r["R"]["linear"][-1], [0, 0, 0, 1])
    assert abs(r["zero_head_probs"] - 0.1) < 1e-7 and abs(r["zero_head_loss"] - math.log(10)) < 1e-5
    assert set(r["zero_shot_48"]) == {"linear", "bilinear", "bicubic", "none"}
    assert set(r["finetuned"]) == {48, 32}
    for size, acc in r["finetuned"].items():         # the reported accuracy is the saved fine-tuned model's
        params, cfg, _ = load_checkpoint(Path(r["finetune_dirs"][size]) / "last.npz")
        ds = load_dataset("shapes", n_train=400, n_test=200, image_size=size, progress=False)   # quick mode's
        probs = predict(params, cfg, normalize(ds.test_images, "minus_one_one"))                 # (200, 10)
        assert np.mean(probs.argmax(axis=1) == ds.test_labels) == acc, (size, acc)


def check_12(r):
    assert r["filters_orthonormal_error"] < 1e-10
    assert r["similarity_diag_error"] < 1e-6
    d = r["distance"]                                                   # (L, nh)
    assert r["rollout_row_sum_error"] < 1e-6
    assert r["rollout_cls_self"] >= 0.5 ** d.shape[0]    # each layer's (A + I) / 2 keeps half of a token on itself
    assert abs(r["rollout_cls_self"] + r["rollout_patch_share"] - 1) < 1e-6   # row 0 of R: class token + patches
    assert abs(r["max_distance"] - 8 * math.sqrt(18)) < 1e-12           # 4x4 grid of 8 px patches
    cells = list(itertools.product(range(4), range(4)))
    uniform = np.mean([8 * math.hypot(a - c, b - e) for (a, b), (c, e) in itertools.product(cells, cells)])
    assert abs(r["uniform_distance"] - uniform) < 1e-12                 # what uniform attention gives
    assert d.shape == (3, 4) and np.abs(d - uniform).max() < 1.5        # quick model: attention nearly uniform
    assert len(r["explained_variance"]) == 28 and np.all(np.diff(r["explained_variance"]) <= 1e-12)
    assert sorted(Path(p).name for p in r["png"]) == ["12_attention_distance.png", "12_attention_maps.png",
                                                     "12_embedding_filters.png", "12_pos_embed_similarity.png",
                                                     "12_rollout.png"]


def check_13(r):
    assert abs(r["rates"]["mask"] - 0.8) < 0.02 and abs(r["rates"]["random"] - 0.1) < 0.02
    assert abs(r["rates"]["keep"] - 0.1) < 0.02
    assert r["target_range"] == (0, 511) and r["n_colours"] > 400     # black to white, most of the 512 colours
    assert max(r["probe_vs_lstsq"].values()) < 1e-8                 # the probe is the closed-form ridge solution
    assert np.mean(r["mpp_losses"][-5:]) < np.mean(r["mpp_losses"][:5])
    assert set(r["fewshot"]) == {"random init", "MPP pre-trained"}  # lesson 10 did not run in this folder
    for table in r["fewshot"].values():
        assert set(table) == {1, 5} and all(0.03 < a < 0.25 for a in table.values())   # near chance (0.1)


def check_14(r):
    assert r["cupy_importers"] == ["backend.py"] and r["get_xp_modules"] >= 5
    s = r["cpu_seconds"]
    assert set(s) == {1, 32, 64} and s[64] > s[1]                    # 64 images take longer than one
    if r["gpu"]:
        assert r["gpu_rel_diff"] < 1e-4
    elif importlib.util.find_spec("cupy") is None:                   # says why the GPU part did not run
        assert "CuPy, which is not installed" in r["reason"], r["reason"]
    else:
        assert "no usable CUDA GPU" in r["reason"], r["reason"]


def check_15(r):
    assert r["real_file"] is False and r["n_rows"] == 44             # 4 + 12 per block * 3 + 2 + 2
    assert r["cfg"]["patch_size"] == 8 and r["cfg"]["width"] == 64 and r["cfg"]["heads"] == 4
    assert r["cfg"]["depth"] == 3 and r["cfg"]["gelu"] == "tanh"
    assert r["param_max_diff"] == 0 and r["logits_max_diff"] == 0     # the hand-written layout loads exactly
    assert r["export_max_diff"] == 0 and r["reload_max_diff"] == 0    # export / load round trip, bit for bit
    assert r["conv_max_diff"] < 1e-4 and r["prefix_ignored"] == ["opt/state/step"]
    z = np.asarray(r["logits"])                                       # (10,) of the drawn shape
    assert r["top_class"] == int(z.argmax()) and r["top_name"] == CLASSES[r["top_class"]]
    assert abs(r["top_prob"] - 1 / np.exp(z - z.max()).sum()) < 1e-12  # softmax at the top: 1 / sum e^(z - z_max)


def check_16(r):
    assert r["layernorm_max_diff"] < 1e-5 and r["gelu_max_diff"] < 1e-4 and r["softmax_max_diff"] < 1e-6
    assert set(r["layernorm_ms"]) == {"reference", "in place", "row blocks", "row blocks + threads"}
    assert set(r["linear_gelu_ms"]) == {"reference", "fused twin"} and set(r["softmax_ms"]) == {"reference", "twin"}
    assert len(r["block_curve"]) >= 3 and r["rows"] == 8 * 65                        # quick: B = 8, N = 65
    assert abs(r["step_loss"]["fast"] - r["step_loss"]["reference"]) < 1e-5          # the same step on both paths
    assert abs(r["step_loss"]["fast"] - math.log(10)) < 0.5                          # near log K at a near-zero head


CHECKS = {"01": check_01, "02": check_02, "03": check_03, "04": check_04, "05": check_05, "06": check_06,
          "07": check_07, "08": check_08, "09": check_09, "10": check_10, "11": check_11, "12": check_12,
          "13": check_13, "14": check_14, "15": check_15, "16": check_16}


# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_lesson_runs_quick_and_returns_its_numbers(path, tmp_path):
    result = load(path).main(quick=True, seed=0, out_dir=tmp_path)
    assert isinstance(result, dict) and result
    for png in pngs(result):                          # pictures go to out_dir, never the source tree
        assert png.resolve().parent == tmp_path.resolve(), png
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    check = CHECKS.get(path.name[:2])
    if check is not None:
        check(result)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_lesson_follows_the_template(path):
    module = load(path)
    doc = module.__doc__ or ""
    assert "Run:" in doc and "You should see" in doc, f"{path.name}: docstring lacks 'Run:' or 'You should see'"
    params = inspect.signature(module.main).parameters
    assert list(params)[:3] == ["quick", "seed", "out_dir"]
    assert params["quick"].default is False and params["seed"].default == 0 and params["out_dir"].default is None
    assert 'if __name__ == "__main__":' in path.read_text()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_lesson_imports_only_minivit_numpy_pillow_and_the_standard_library(path):
    allowed = {"minivit", "numpy", "PIL"} | set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_every_lesson_is_present_and_has_its_check():
    numbers = {p.name[:2] for p in FILES}
    assert numbers == set(CHECKS) == {f"{i:02d}" for i in range(1, 17)}
