"""Model configuration: one frozen dataclass and a plain dict of named configs.

The paper's sizes (Table 1 of Dosovitskiy et al.) with the patch sizes the original code ships, the Ti and S
sizes the original code added later, small CPU configs, and a "test" config small enough for a whole-model
float64 gradient check. Parameter counts are computed from shapes alone (no allocation) and pinned in the tests
against the original code's numbers (ViT-B/16: 86,567,656).
"""
import math
from dataclasses import asdict, dataclass, replace

from minivit.tree import flatten

POOLINGS = ("token", "gap")    # the original code's `classifier` option
GELUS = ("tanh", "exact")      # original JAX ViT: tanh approximation; PyTorch/timm: exact erf form


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224          # H = W, or an (H, W) pair
    patch_size: int = 16           # P
    channels: int = 3              # C
    num_classes: int = 1000        # K
    width: int = 768               # D
    depth: int = 12                # number of encoder blocks
    heads: int = 12                # nh; head size hs = D / nh
    mlp_dim: int = 3072            # M
    pooling: str = "token"         # 'token': class token; 'gap': mean of the patch tokens (no class token)
    representation_size: int = 0   # > 0 adds the pre-training head's dense + tanh "pre_logits" layer
    dropout: float = 0.0           # after the position embedding add and after every dense layer but qkv
    attn_dropout: float = 0.0      # on the attention probabilities
    drop_path: float = 0.0         # stochastic depth rate of the last block (linearly rising from 0)
    gelu: str = "tanh"             # 'tanh' (original ViT) or 'exact' (timm)
    ln_eps: float = 1e-6           # original ViT and timm LayerNorm

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (list, tuple)):
            object.__setattr__(self, "image_size", tuple(int(s) for s in size))
        hw = self.image_hw
        for name in ("patch_size", "channels", "num_classes", "width", "depth", "heads", "mlp_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if any(not isinstance(s, int) or s <= 0 for s in hw):
            raise ValueError(f"image_size must be a positive integer or (H, W) pair, got {size!r}")
        for s in hw:
            if s % self.patch_size:
                raise ValueError(f"image size {s} is not divisible by patch size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gelu not in GELUS:
            raise ValueError(f"gelu must be one of {GELUS}, got {self.gelu!r}")
        if not isinstance(self.representation_size, int) or self.representation_size < 0:
            raise ValueError(f"representation_size must be an integer >= 0, got {self.representation_size!r}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps must be positive, got {self.ln_eps!r}")

    @property
    def image_hw(self):
        """(H, W)."""
        s = self.image_size
        return tuple(s) if isinstance(s, tuple) else (s, s)

    @property
    def grid(self):
        """(gh, gw): the patch grid."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self):
        gh, gw = self.grid
        return gh * gw

    @property
    def n_prefix(self):
        """Tokens before the patch tokens: 1 (the class token) for 'token' pooling, 0 for 'gap'."""
        return 1 if self.pooling == "token" else 0

    @property
    def seq_len(self):
        """N: tokens per image, the class token included when there is one."""
        return self.n_prefix + self.num_patches

    @property
    def head_dim(self):
        """hs = D / nh."""
        return self.width // self.heads

    def replace(self, **changes):
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)

    def to_dict(self):
        d = asdict(self)
        if isinstance(d["image_size"], tuple):
            d["image_size"] = list(d["image_size"])
        return d

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return cls(**d)


def _paper(width, depth, mlp, heads, patch, **kw):
    return ViTConfig(image_size=224, patch_size=patch, width=width, depth=depth, mlp_dim=mlp, heads=heads, **kw)


# The sizes: (width D, depth, MLP M, heads) from the paper's Table 1 (B, L, H) and the original code (Ti, S).
CONFIGS = {
    "vit-ti16": _paper(192, 12, 768, 3, 16),
    "vit-s16": _paper(384, 12, 1536, 6, 16),
    "vit-s32": _paper(384, 12, 1536, 6, 32),
    "vit-b8": _paper(768, 12, 3072, 12, 8),
    "vit-b16": _paper(768, 12, 3072, 12, 16),
    "vit-b32": _paper(768, 12, 3072, 12, 32),
    "vit-l16": _paper(1024, 24, 4096, 16, 16),
    "vit-l32": _paper(1024, 24, 4096, 16, 32),
    "vit-h14": _paper(1280, 32, 5120, 16, 14),
    # Small CPU configs.
    "mnist-tiny": ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10,
                            width=64, depth=4, heads=4, mlp_dim=128),
    "cifar-small": ViTConfig(image_size=32, patch_size=4, channels=3, num_classes=10,
                             width=192, depth=6, heads=3, mlp_dim=768),
    "shapes-small": ViTConfig(image_size=32, patch_size=8, channels=3, num_classes=10,
                              width=128, depth=4, heads=4, mlp_dim=256),
    # Small enough for a whole-model float64 gradient check in well under a second.
    "test": ViTConfig(image_size=8, patch_size=4, channels=3, num_classes=5,
                      width=12, depth=2, heads=3, mlp_dim=16),
}


def get_config(name, **overrides):
    """A named config (case-insensitive; 'ViT-B/16' and 'vit-b16' both work) with optional field overrides."""
    key = str(name).lower().replace("/", "")
    if key not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(CONFIGS)}")
    cfg = CONFIGS[key]
    return cfg.replace(**overrides) if overrides else cfg


def param_shapes(cfg):
    """The shape of every parameter, as the same nested tree `init_params` returns (no arrays allocated)."""
    D, M, K, P, C = cfg.width, cfg.mlp_dim, cfg.num_classes, cfg.patch_size, cfg.channels
    shapes = {"patch_embed": {"w": (P * P * C, D), "b": (D,)}}
    if cfg.n_prefix:
        shapes["cls_token"] = (1, 1, D)
    shapes["pos_embed"] = (1, cfg.seq_len, D)
    shapes["blocks"] = [{
        "norm1": {"w": (D,), "b": (D,)},
        "attn": {"qkv_w": (D, 3 * D), "qkv_b": (3 * D,), "proj_w": (D, D), "proj_b": (D,)},
        "norm2": {"w": (D,), "b": (D,)},
        "mlp": {"fc1_w": (D, M), "fc1_b": (M,), "fc2_w": (M, D), "fc2_b": (D,)},
    } for _ in range(cfg.depth)]
    shapes["norm"] = {"w": (D,), "b": (D,)}
    rep = cfg.representation_size
    if rep:
        shapes["pre_logits"] = {"w": (D, rep), "b": (rep,)}
    shapes["head"] = {"w": (rep or D, K), "b": (K,)}
    return shapes


def count_params(cfg):
    """Number of parameters of a config, from shapes alone."""
    return sum(math.prod(s) for s in flatten(param_shapes(cfg), is_leaf=lambda v: isinstance(v, tuple)).values())
