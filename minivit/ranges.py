"""The allowed values of every numeric setting, in one table that the command line and the Python API both check.

    LR.check(0.5, "lr")           -> 0.5;  LR.check(float("inf"), "lr") raises ValueError naming `lr`
    parser.add_argument("--lr", type=LR)   argparse: "argument --lr: expected a finite number > 0, got 'inf'"

A Range is a number type (int or float) with optional bounds, each closed or open. Floats must be finite (NaN and
infinity are never a setting); ints must be integers (2.5 and True are not). The command line declares each flag
with `type=` one of these, so a bad value stops at parse time with the flag named, before any data is read; the
training loop checks the same table on TrainConfig, so the API refuses the same values with the field named.
"""
import argparse
import math
import numbers


class Range:
    """Allowed values of a numeric setting: kind int or float, bounds lo/hi (None: unbounded), each open or closed.

    check(value, name) -> the value (as kind), or ValueError naming `name`, the range and what was found.
    Calling a Range on a string parses it (argparse's `type=`), raising ArgumentTypeError on a bad value.
    """

    def __init__(self, kind, lo=None, hi=None, lo_open=False, hi_open=False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = kind.__name__           # argparse names the type in its messages

    def describe(self):
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {self.hi}"
        return what

    def contains(self, v):
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def check(self, value, name):
        """-> value as self.kind; ValueError '<name> must be <range>, got <value>' otherwise."""
        ok_type = (isinstance(value, numbers.Integral) and not isinstance(value, bool) if self.kind is int else
                   isinstance(value, numbers.Real) and not isinstance(value, bool))
        if not ok_type or (self.kind is float and not math.isfinite(value)) or not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return self.kind(value)

    def __call__(self, text):
        try:
            value = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if (self.kind is float and not math.isfinite(value)) or not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value


def int_list(item_range):
    """argparse type for a comma-separated list of integers, each in `item_range` (e.g. --shots 1,5,10)."""
    def parse(text):
        items = [t.strip() for t in str(text).split(",")]
        if not items or any(not t for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_range.describe()}s, "
                                             f"got {text!r}")
        return tuple(item_range(t) for t in items)
    parse.__name__ = "list"
    return parse


def float_list(item_range, count=None):
    """argparse type for a comma-separated list of numbers in `item_range` (exactly `count` of them if given)."""
    def parse(text):
        items = [t.strip() for t in str(text).split(",")]
        if count is not None and len(items) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return tuple(item_range(t) for t in items)
    parse.__name__ = "list"
    return parse


POSITIVE = Range(int, 1)                    # counts: epochs, batch sizes, widths, threads, ...
NON_NEGATIVE = Range(int, 0)                # counts where 0 means "off": --save-every, --max-steps, --warmup-steps
FRACTION = Range(float, 0.0, 1.0, hi_open=True)                 # a probability or rate in [0, 1)
NON_NEGATIVE_FLOAT = Range(float, 0.0)
POSITIVE_FLOAT = Range(float, 0.0, lo_open=True)
SEED = Range(int, 0)                        # NumPy's generators take non-negative seeds
IMAGE_SIZE = Range(int, 1, 8192)            # pixels per side: beyond 8192 a single image of a ViT is 100+ GB of
#                                             activations; larger inputs are a mistake, not a setting
ROTATE_DEG = Range(float, 0.0, 180.0)

# TrainConfig's numeric fields -> their range (train.resolve_defaults checks each; cli.py declares the same ranges).
TRAIN_RANGES = {
    "n_train": POSITIVE, "n_test": POSITIVE, "image_size": IMAGE_SIZE,
    "epochs": POSITIVE, "max_steps": NON_NEGATIVE, "batch_size": POSITIVE, "accum_steps": POSITIVE,
    "lr": POSITIVE_FLOAT, "min_lr": NON_NEGATIVE_FLOAT, "weight_decay": NON_NEGATIVE_FLOAT,
    "momentum": FRACTION, "beta1": FRACTION, "beta2": FRACTION,
    "warmup_steps": NON_NEGATIVE, "label_smoothing": FRACTION, "clip_norm": NON_NEGATIVE_FLOAT,
    "crop_pad": NON_NEGATIVE, "rotate_deg": ROTATE_DEG, "shift": NON_NEGATIVE_FLOAT, "scale": FRACTION,
    "mixup": NON_NEGATIVE_FLOAT, "seed": SEED, "eval_every": POSITIVE, "save_every": NON_NEGATIVE,
    "eval_batch_size": POSITIVE,
}

# the model overrides of the command line (ViTConfig checks them again)
MODEL_RANGES = {"width": POSITIVE, "depth": POSITIVE, "heads": POSITIVE, "mlp_dim": POSITIVE,
                "patch_size": POSITIVE, "dropout": FRACTION, "attn_dropout": FRACTION, "drop_path": FRACTION}
