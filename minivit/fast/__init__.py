"""The engine room: fast twins of the reference layer pairs (minivit/layers.py, minivit/attention.py) and of the
optimizer's Adam update, with the same names and signatures, each tested equal to its reference
(tests/test_fast.py). This namespace holds a complete set of the layer pairs the model calls, as
minivit.reference does: the twins below, and the reference pairs that need none (their NumPy is already one pass
or a copy), re-exported as they are.

    twins here:        linear, patch_embed, layernorm, gelu (tanh form), linear_gelu, softmax, attention,
                       adam_update
    reference as is:   tokens, dropout, drop_path

rows.py holds the tools the twins are made of (row blocks, scratch buffers, split products, fused CUDA kernels).
"""
from minivit.fast.attention import attention_backward, attention_forward
from minivit.fast.layers import (gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, linear_backward,
                                 linear_forward, linear_gelu_backward, linear_gelu_forward, patch_embed_backward,
                                 patch_embed_forward, softmax_backward, softmax_forward)
from minivit.fast.optim import adam_update
from minivit.layers import (drop_path_backward, drop_path_forward, dropout_backward, dropout_forward, tokens_backward,
                            tokens_forward)
