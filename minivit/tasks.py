"""What the training loop optimizes: a task turns a batch into (loss, gradients) and scores a model on test images.

    ClassificationTask()    the supervised cross-entropy on the labels (what `minivit train` and fine-tuning run)
    MPPTask(mask_rate=0.5)  masked patch prediction, the paper's self-supervised objective (minivit.mpp)

Every task has the same members, and minivit.train's loop (batches, schedule, checkpoints, resume) runs any of them:

    name                                            stored in the checkpoint's meta["task"]
    prepare(params, cfg, seed) -> params            add the task's own parameters (none for classification)
    check(normalize, freeze_backbone)               raise ValueError for settings the task cannot train with
    loss_and_grads(params, cfg, x, y, soft_targets=None, smoothing=0.0, accum_steps=1, seed=0, step=0,
                   freeze_backbone=False) -> (mean loss, grads, correct, counted)
    evaluate(params, cfg, images, labels, normalize_fn, batch_size) -> {"accuracy", "loss", ...}

The arguments are the pieces of the run a task needs, never the whole training config. An update's batch is
split into accum_steps micro-batches (`accumulate_micro_batches`, the one accumulation loop); the draws of
micro-batch m of update `step` come from generators of the run seed:
    dropout (and stochastic depth):  np.random.default_rng([seed, 2, step, m])
    the MPP corruption:              np.random.default_rng([seed, 3, step, m])
so a resumed run draws exactly what an uninterrupted one would have.
"""
import numpy as np

from minivit.backend import get_xp, to_numpy
from minivit.inference import run_batched
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import head_backward, vit_backward, vit_forward
from minivit.mpp import add_mpp_params, check_rates, draw_corruption, mpp_loss_backward, mpp_loss_forward, mpp_targets
from minivit.tree import accumulate

DROPOUT_STREAM, CORRUPTION_STREAM, EVAL_CORRUPTION_STREAM = 2, 3, 4   # the second entry of the generators' seeds


def accumulate_micro_batches(micro_step, B, accum_steps):
    """Run micro_step(m, rows, dloss) over the accum_steps micro-batches of a batch of B -> (mean loss, grads, extras).

    rows = slice of micro-batch m in the batch; dloss = micro / B, the weight of its mean loss in the batch's mean.
    micro_step returns (its mean loss, the gradients of dloss times it, anything else); the gradients are summed
    (the sum is the gradient of the batch's mean loss), the losses weighted, the extras listed in order.
    """
    micro = B // accum_steps
    total_loss, grads, extras = 0.0, None, []
    for m in range(accum_steps):
        loss, g, extra = micro_step(m, slice(m * micro, (m + 1) * micro), micro / B)
        grads = accumulate(grads, g)                                           # sum over micro-batches
        total_loss += float(loss) * micro / B
        extras.append(extra)
    return total_loss, grads, extras


# ----------------------------------------------------------------------------------------------------------------
# Classification.

def evaluate(params, cfg, images, labels, normalize_fn, batch_size=500, num_classes=None):
    """Accuracy, mean loss and the confusion matrix (K, K) of `params` on uint8 images (evaluation mode).

    An image whose logits are not all finite has no prediction: it counts as wrong, stays out of the confusion
    matrix, and is counted in "nonfinite" (argmax would have called it class 0). No images: ValueError.
    """
    K = num_classes or cfg.num_classes
    if len(images) == 0:
        raise ValueError("there are no images to evaluate on (an empty test split?)")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")

    def score(x, batch):
        y = labels[batch]                                                                  # (b,) host
        logits, _ = vit_forward(params, x, cfg, keep_cache=False)                        # (b, K)
        loss, _ = cross_entropy_forward(logits, y)
        finite = get_xp(logits).isfinite(logits).all(axis=1)                             # (b,)
        return y, logits.argmax(axis=1), finite, loss

    confusion = np.zeros((K, K), dtype=np.int64)
    total_loss, nonfinite = 0.0, 0
    for y, pred, finite, loss in run_batched(score, images, params, batch_size, normalize_fn):
        total_loss += float(loss) * len(y)
        np.add.at(confusion, (y[finite], pred[finite]), 1)
        nonfinite += int((~finite).sum())
    n = len(images)
    return {"accuracy": float(np.trace(confusion)) / n, "loss": total_loss / n, "confusion": confusion,
            "nonfinite": nonfinite}


def classification_loss_and_grads(params, cfg, x, targets, smoothing=0.0, accum_steps=1, seed=0, step=0,
                                  freeze_backbone=False):
    """Forward + cross-entropy + backward of one update, accumulated over accum_steps micro-batches.

    targets: (B,) labels or (B, K) soft targets (mixup). Returns (mean loss, grads, logits (B, K)); with
    freeze_backbone only the head has gradients (a linear probe: dropout stays off, the backward stops at the head).
    """
    def micro_step(m, rows, dloss):
        rng = np.random.default_rng([seed, DROPOUT_STREAM, step, m])
        logits, cache = vit_forward(params, x[rows], cfg, train=not freeze_backbone, rng=rng)
        loss, ce_cache = cross_entropy_forward(logits, targets[rows], smoothing)
        dlogits = cross_entropy_backward(dloss, ce_cache)                                 # (micro, K)
        if freeze_backbone:
            return loss, head_backward(dlogits, cache)[1], logits                         # only the head learns
        return loss, vit_backward(dlogits, cache)[1], logits

    loss, grads, logits = accumulate_micro_batches(micro_step, x.shape[0], accum_steps)
    return loss, grads, get_xp(logits[0]).concatenate(logits)                             # (B, K)


class ClassificationTask:
    """The supervised classification loss on the data's labels (or mixup's soft targets): name "classification"."""
    name = "classification"

    def prepare(self, params, cfg, seed):
        return params

    def check(self, normalize, freeze_backbone):
        pass

    def loss_and_grads(self, params, cfg, x, y, soft_targets=None, smoothing=0.0, accum_steps=1, seed=0, step=0,
                       freeze_backbone=False):
        targets = y if soft_targets is None else soft_targets                  # (B,) labels or (B, K) mixup
        loss, grads, logits = classification_loss_and_grads(params, cfg, x, targets, smoothing, accum_steps, seed,
                                                            step, freeze_backbone)
        pred = to_numpy(logits.argmax(axis=1))
        return loss, grads, int((pred == y).sum()), len(y)

    def evaluate(self, params, cfg, images, labels, normalize_fn, batch_size):
        return evaluate(params, cfg, images, labels, normalize_fn, batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Masked patch prediction.

class MPPTask:
    """Masked patch prediction (minivit.mpp, the paper's section 4.6): name "mpp".

    The corruption of micro-batch m of update t is drawn from np.random.default_rng([seed, 3, t, m]) (a stream of
    its own beside shuffling, augmentation and dropout), so a resumed run corrupts exactly the same patches.
    Evaluation corrupts the test images with a fixed generator, so every epoch is scored on the same task.
    The classification labels of the data are not used; mixup's soft targets are ignored (the colour targets are
    read off the (mixed) pixels).
    """
    name = "mpp"

    def __init__(self, mask_rate=0.5, replace_rates=(0.8, 0.1, 0.1), bits=3, eval_seed=0):
        self.replace_rates = check_rates(mask_rate, replace_rates)
        self.mask_rate = float(mask_rate)
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
        self.bits = bits
        self.eval_seed = eval_seed

    def settings(self):
        """What a checkpoint stores under meta["mpp"] to rebuild this task (MPPTask(**settings))."""
        return {"mask_rate": self.mask_rate, "replace_rates": list(self.replace_rates), "bits": self.bits}

    def prepare(self, params, cfg, seed):
        return add_mpp_params(params, cfg, seed, self.bits)

    def check(self, normalize, freeze_backbone):
        if freeze_backbone:
            raise ValueError("masked patch prediction trains the whole model; freeze_backbone is not supported")
        if normalize != "minus_one_one":
            raise ValueError(f"masked patch prediction's colour targets are defined on [-1, 1] pixels: use "
                             f"normalize='minus_one_one', not {normalize!r}")

    def _corruption(self, B, cfg, rng):
        return draw_corruption(B, cfg.num_patches, rng, self.mask_rate, self.replace_rates)

    def loss_and_grads(self, params, cfg, x, y, soft_targets=None, smoothing=0.0, accum_steps=1, seed=0, step=0,
                       freeze_backbone=False):
        """-> (mean loss over the corrupted patches, grads, correctly predicted colours, corrupted patches)."""
        if freeze_backbone:
            raise ValueError("masked patch prediction trains the whole model; freeze_backbone is not supported")

        def micro_step(m, rows, dloss):
            xm = x[rows]                                                                  # (micro, H, W, C)
            corruption = self._corruption(len(xm), cfg, np.random.default_rng([seed, CORRUPTION_STREAM, step, m]))
            targets = mpp_targets(xm, cfg.patch_size, corruption, self.bits)             # (S,) host
            loss, logits, cache = mpp_loss_forward(params, xm, cfg, corruption, targets, train=True,
                                                   rng=np.random.default_rng([seed, DROPOUT_STREAM, step, m]),
                                                   smoothing=smoothing)
            _, g = mpp_loss_backward(cache, dloss)        # every image has n_c targets: the mean over the batch
            correct = int((to_numpy(logits.argmax(axis=1)) == targets).sum())
            return loss, g, (correct, len(targets))

        loss, grads, counts = accumulate_micro_batches(micro_step, x.shape[0], accum_steps)
        return loss, grads, sum(c for c, _ in counts), sum(n for _, n in counts)

    def evaluate(self, params, cfg, images, labels, normalize_fn, batch_size=500):
        """uint8 images -> {"accuracy": colour accuracy on the corrupted patches, "loss": their mean loss,
        "patches": how many were scored}. The classification labels are not used."""
        def score(x, batch):
            rng = np.random.default_rng([self.eval_seed, EVAL_CORRUPTION_STREAM, batch.start])
            corruption = self._corruption(len(x), cfg, rng)
            targets = mpp_targets(x, cfg.patch_size, corruption, self.bits)
            loss, logits, _ = mpp_loss_forward(params, x, cfg, corruption, targets)
            logits = to_numpy(logits)                                                     # (S, 2^(3 bits))
            hit = (logits.argmax(axis=1) == targets) & np.isfinite(logits).all(axis=1)  # NaN logits: no hit
            return float(loss) * len(targets), int(hit.sum()), len(targets)

        if len(images) == 0:
            raise ValueError("there are no images to evaluate on (an empty test split?)")
        total_loss, correct, counted = 0.0, 0, 0
        for loss, c, n in run_batched(score, images, params, batch_size, normalize_fn):
            total_loss += loss
            correct += c
            counted += n
        n = max(counted, 1)
        return {"accuracy": correct / n, "loss": total_loss / n, "patches": counted}


def task_from_meta(meta):
    """The task a checkpoint was trained with: MPPTask (with its meta["mpp"] settings) or ClassificationTask."""
    if meta.get("task") == "mpp":
        return MPPTask(**meta.get("mpp", {}))
    return ClassificationTask()
