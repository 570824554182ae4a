"""Few-shot linear evaluation: regularized least squares on frozen representations, in closed form.

The paper's cheap probe of a representation (section 4, "few-shot accuracies"), computed as the authors' released
evaluator does it (big_vision/evaluators/fewshot_lsr.py):

    X (n, F)  frozen features of n = shots * K training images: the class token after the final LayerNorm, or
              the mean of the patch tokens for 'gap' models (vit_forward's cache["pooled"]; representation
              'patch_mean' takes the patch-token mean of a class-token model instead)
    Z = [(X - mean) / std, 100]    (n, F + 1)  standardized with the shot set's own mean and (population) std
                                   (+ 1e-5), and a constant bias feature of 100, large so the bias is nearly
                                   unregularized (its weight's penalty is l2 / 100^2)
    T = 2 onehot(y) - 1            (n, K)      targets in {-1, 1}
    W = argmin ||Z W - T||^2 + l2 ||W||^2      (F + 1, K), l2 = 2^10
      = (Z^T Z + l2 I)^-1 Z^T T    when n >= F + 1   (the (F+1) x (F+1) system)
      = Z^T (Z Z^T + l2 I)^-1 T    when n <  F + 1   (the n x n system; the same W: push-through identity)
    prediction = argmax over k of Z_test W (test features standardized with the shot set's mean and std)

Shots per class are drawn as big_vision does: for seed s, rng = np.random.default_rng(s) permutes each class's
training indices (class by class, in label order) and n shots take the first n of every permutation, so the 5-shot
set of a seed contains its 1-shot set. Accuracy is averaged over seeds (0, 1, 2 by default).

    feats = extract_features(params, cfg, images_uint8, normalize_fn)        # (n, F) float64
    table = fewshot_eval(train_feats, train_labels, test_feats, test_labels) # one row per shot count
"""
import numpy as np

from minivit.checkpoint import load_checkpoint
from minivit.data.checkpoint_data import dataset_for_checkpoint, normalizer_from_meta
from minivit.inference import run_batched
from minivit.model import encoder_forward, layer_ops, vit_forward

BIAS_CONSTANT = 100.0   # big_vision fewshot_lsr: a large constant bias feature, so the bias is barely regularized
STD_EPS = 1e-5          # big_vision fewshot_lsr: std + 1e-5, so a constant feature does not divide by zero
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_L2 = 2.0 ** 10
REPRESENTATIONS = ("pooled", "patch_mean")


# ----------------------------------------------------------------------------------------------------------------
# Features.

def feature_width(cfg, representation="pooled"):
    """F: the width of a representation ('pooled' goes through pre_logits when the model has one)."""
    return cfg.representation_size or cfg.width if representation == "pooled" else cfg.width


def extract_features(params, cfg, images, normalize_fn, batch_size=500, representation="pooled"):
    """uint8 images (n, H, W, C) -> (n, F) float64 host array, in evaluation mode.

    representation 'pooled' (the paper's and big_vision's): vit_forward's cache["pooled"], the class token after
    the final norm (the patch-token mean for 'gap' models; after pre_logits when the model has one).
    'patch_mean': the mean of the patch tokens after the final norm, also for class-token models (masked patch
    prediction trains the patch tokens' outputs, never the class token's).
    Extra parameters (a masked patch prediction checkpoint's) are ignored.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")

    def features(x, batch):
        if representation == "pooled":
            _, cache = vit_forward(params, x, cfg, keep_cache=False)
            return cache["pooled"]                                              # (b, F)
        ops = layer_ops()                                                       # as vit_forward chooses them
        e, _ = ops.patch_embed_forward(x, params["patch_embed"]["w"], params["patch_embed"]["b"], cfg.patch_size)
        y, _ = encoder_forward(e, params, cfg, keep_cache=False)                # (b, N, D)
        return y[:, cfg.n_prefix:].mean(axis=1)                                 # (b, D)

    out = [np.asarray(f, dtype=np.float64) for f in run_batched(features, images, params, batch_size, normalize_fn)]
    return np.concatenate(out) if out else np.zeros((0, feature_width(cfg, representation)))


# ----------------------------------------------------------------------------------------------------------------
# The regression.

def standardize(X, mean, std):
    """X: (n, F) -> Z (n, F + 1) = [(X - mean) / std, BIAS_CONSTANT]."""
    Z = (np.asarray(X, dtype=np.float64) - mean) / std                       # (n, F)
    return np.concatenate([Z, np.full((Z.shape[0], 1), BIAS_CONSTANT)], axis=1)   # (n, F + 1)


def _check_labels(y, num_classes):
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def fewshot_fit(X, y, num_classes, l2=DEFAULT_L2):
    """X: (n, F) features, y: (n,) labels -> (W (F + 1, K), mean (1, F), std (1, F)): the exact ridge solution.

    W = argmin ||Z W - T||^2 + l2 ||W||^2 with Z = standardize(X), T = 2 onehot(y) - 1; solved with whichever of
    the two equivalent normal equations is smaller (see the module docstring). Float64 throughout.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (n, F) array, got shape {X.shape}")
    y = _check_labels(y, num_classes)
    if len(y) != len(X):
        raise ValueError(f"got {len(y)} labels for {len(X)} feature rows")
    if not l2 > 0:
        raise ValueError(f"l2 must be positive, got {l2!r}")
    mean = X.mean(axis=0, keepdims=True)                                     # (1, F)
    std = X.std(axis=0, keepdims=True) + STD_EPS                             # (1, F) population std (ddof 0)
    Z = standardize(X, mean, std)                                            # (n, F + 1)
    T = 2.0 * np.eye(num_classes)[y] - 1.0                                   # (n, K) in {-1, 1}
    n, d = Z.shape
    if n >= d:
        W = np.linalg.solve(Z.T @ Z + l2 * np.eye(d), Z.T @ T)               # (F + 1, K)
    else:
        W = Z.T @ np.linalg.solve(Z @ Z.T + l2 * np.eye(n), T)               # (F + 1, K)
    return W, mean, std


def fewshot_predict(W, X, mean, std):
    """X: (m, F) -> predicted labels (m,) = argmax_k of standardize(X) @ W."""
    return (standardize(X, mean, std) @ W).argmax(axis=1)


def select_shots(labels, shots, seed, num_classes):
    """-> indices (shots * K,) of `shots` training images per class, big_vision's way (see the module docstring)."""
    labels = _check_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    short = [(k, len(p)) for k, p in enumerate(perms) if len(p) < shots]
    if short:
        raise ValueError(f"{shots}-shot needs {shots} training images per class; class {short[0][0]} has "
                         f"{short[0][1]}")
    return np.concatenate([p[:shots] for p in perms])


def fewshot_eval(train_feats, train_labels, test_feats, test_labels, shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS,
                 l2=DEFAULT_L2, num_classes=None):
    """-> table: [{"shots": n, "accuracy": mean over seeds, "std": their sample standard deviation (ddof 1),
    "per_seed": [accuracy of each seed]}], one row per shot count, in the order of `shots`.

    For every seed and shot count: pick the shots (select_shots), fit on their features, score on all test
    features. num_classes defaults to max(label) + 1 over both splits.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    K = num_classes or int(max(train_labels.max(initial=-1), test_labels.max(initial=-1)) + 1)
    test_labels = _check_labels(test_labels, K)
    table = []
    for n in shots:
        accs = []
        for seed in seeds:
            idx = select_shots(train_labels, n, seed, K)                     # (n * K,)
            W, mean, std = fewshot_fit(train_feats[idx], train_labels[idx], K, l2)
            accs.append(float((fewshot_predict(W, test_feats, mean, std) == test_labels).mean()))
        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        table.append({"shots": int(n), "accuracy": float(np.mean(accs)), "std": std,
                      "per_seed": accs})
    return table


# ----------------------------------------------------------------------------------------------------------------
# The command (`minivit fewshot CHECKPOINT`).

def fewshot_model(params, cfg, ds, normalize_fn, shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS, l2=DEFAULT_L2,
                  batch_size=500, representation="pooled"):
    """Few-shot table of a model on a Dataset (train split: the shot pool; test split: scored).

    Only the training images some (seed, shots) draws need are pushed through the model (big_vision embeds the
    whole split; the features of an image do not depend on the others, so the result is the same).
    """
    K = ds.num_classes
    needed = np.unique(np.concatenate([select_shots(ds.train_labels, max(shots), s, K) for s in seeds]))
    train_feats = np.zeros((len(ds.train_labels), feature_width(cfg, representation)))
    train_feats[needed] = extract_features(params, cfg, ds.train_images[needed], normalize_fn, batch_size,
                                           representation)
    test_feats = extract_features(params, cfg, ds.test_images, normalize_fn, batch_size, representation)
    return fewshot_eval(train_feats, ds.train_labels, test_feats, ds.test_labels, shots, seeds, l2, K)


def run_fewshot(checkpoint_path, dataset=None, data_dir=None, shots=DEFAULT_SHOTS, seeds=3, l2=DEFAULT_L2,
                n_train=None, n_test=None, batch_size=500, device=None, data=None, representation="pooled"):
    """Load a minivit checkpoint and return its few-shot table (rows as fewshot_eval's) on `dataset` (default:
    the data set it was trained on; shapes: n_train / n_test images, default 20000 / 2000). `seeds` is a count
    (seeds 0 .. seeds-1) or a list. `data`: an already loaded Dataset instead."""
    params, cfg, meta = load_checkpoint(checkpoint_path, device=device)
    data_meta = meta.get("data", {})
    if data is None:
        data = dataset_for_checkpoint(data_meta, dataset, data_dir, cfg.image_hw[0], n_train, n_test)
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    return fewshot_model(params, cfg, data, normalizer_from_meta(data_meta), tuple(shots), seeds, l2, batch_size,
                         representation)


def format_table(table, title=None):
    """The rows of fewshot_eval as text: shots, mean accuracy +- std, and each seed's accuracy."""
    lines = [title] if title else []
    lines.append(f"{'shots':>5}  {'accuracy':>8}  {'std':>6}  per seed")
    for row in table:
        seeds = " ".join(f"{a:.4f}" for a in row["per_seed"])
        lines.append(f"{row['shots']:>5}  {row['accuracy']:>8.4f}  {row['std']:>6.4f}  {seeds}")
    return "\n".join(lines)
