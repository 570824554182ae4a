"""The reference pairs in one namespace, with the same names as their fast twins in minivit.fast, and the switch
between the two.

The model runs minivit.fast by default. MINIVIT_REFERENCE=1 in the environment (the command line's --reference),
or reference=True in vit_forward / encoder_forward, runs it on these: the plain code of layers.py and
attention.py, which a learner can step through in a debugger line by line. Both give the same results to rounding
(tests/test_fast.py).
"""
import os

from minivit.attention import attention_backward, attention_forward
from minivit.layers import (drop_path_backward, drop_path_forward, dropout_backward, dropout_forward, gelu_backward,
                            gelu_forward, layernorm_backward, layernorm_forward, linear_backward, linear_forward,
                            linear_gelu_backward, linear_gelu_forward, patch_embed_backward, patch_embed_forward,
                            softmax_backward, softmax_forward, tokens_backward, tokens_forward)

LAYER_PAIRS = ("attention", "drop_path", "dropout", "gelu", "layernorm", "linear", "linear_gelu", "patch_embed",
               "softmax", "tokens")   # each has a _forward and a _backward here and in minivit.fast


def use_reference(reference=None):
    """True when the reference pairs should run: `reference` when given, else MINIVIT_REFERENCE=1."""
    if reference is not None:
        return bool(reference)
    return os.environ.get("MINIVIT_REFERENCE", "").strip().lower() in ("1", "true", "yes")
