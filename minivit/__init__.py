"""minivit: the Vision Transformer from scratch in NumPy (CPU) and CuPy (GPU).

Every layer is a forward/backward pair written by hand (layers.py, attention.py, model.py, loss.py), and every
backward pass is proven by a gradient check (gradcheck.py, tests/).
"""
from minivit.backend import DeviceError, get_backend, get_xp, resolve_device, to_device, to_numpy
from minivit.config import CONFIGS, ViTConfig, count_params, get_config, param_shapes
from minivit.gradcheck import gradcheck, gradcheck_model
from minivit.inference import predict
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import attention_probs, init_params, vit_backward, vit_forward
from minivit.optim import (clip_by_global_norm, lr_at, optimizer_init, optimizer_step)
from minivit.tree import flatten, num_params, tree_map, unflatten

__version__ = "0.1.0"
