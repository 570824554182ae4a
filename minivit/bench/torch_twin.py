"""The PyTorch eager twin of a minivit model, for `minivit bench --vs-torch` only.

PyTorch is never a dependency of minivit: this module imports torch at its top and is itself imported only by a
benchmark worker process that was asked for it (worker.serve, a deferred import). The model is what a PyTorch user
would write for the same ViT: nn.Linear, nn.LayerNorm(eps=1e-6), explicit attention math (softmax(q k^T / sqrt(hs))
v, no fused kernel), GELU in its tanh form (the configs' default), the same patch layout (row, col, channel) as
`minivit.layers.patchify`, and torch.optim.AdamW with weight decay on the same tensors as minivit's AdamW
(matrices, not biases, norms, the position embedding or the class token). Weights come from the same `bench_params`
as minivit's (nn.Linear stores (D_out, D_in): transposed on load).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minivit.bench.cases import LR, WEIGHT_DECAY, bench_batch, bench_params
from minivit.config import get_config
from minivit.tree import flatten


class Attention(nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        B, N, D = x.shape
        nh, hs = self.heads, D // self.heads
        q, k, v = self.qkv(x).reshape(B, N, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)   # (B, nh, N, hs)
        att = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))).softmax(dim=-1)       # (B, nh, N, N)
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, D, M, approximate):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(D, M), nn.Linear(M, D), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh" if self.approximate == "tanh" else "none"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.norm1 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.attn = Attention(D, cfg.heads)
        self.norm2 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = Mlp(D, cfg.mlp_dim, cfg.gelu)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchViT(nn.Module):
    """The ViT of `cfg` on (B, H, W, C) images, as minivit.model.vit_forward computes it."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        P, C, D = cfg.patch_size, cfg.channels, cfg.width
        self.patch_embed = nn.Linear(P * P * C, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.n_prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        rep = cfg.representation_size
        self.pre_logits = nn.Linear(D, rep) if rep else None
        self.head = nn.Linear(rep or D, cfg.num_classes)

    def forward(self, x):
        B, H, W, C = x.shape
        P = self.cfg.patch_size
        gh, gw = H // P, W // P
        x = x.reshape(B, gh, P, gw, P, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, P * P * C)
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cfg.pooling == "token" else x.mean(dim=1)
        if self.pre_logits is not None:
            pooled = torch.tanh(self.pre_logits(pooled))
        return self.head(pooled)


def torch_name(key):
    """minivit dotted name -> (PyTorch state_dict name, transpose?): blocks.0.attn.qkv_w -> blocks.0.attn.qkv.weight."""
    *path, leaf = key.split(".")
    if leaf in ("cls_token", "pos_embed"):
        return key, False
    if leaf in ("w", "b"):                                # patch_embed, norm*, pre_logits, head
        transpose = leaf == "w" and path[-1] not in ("norm", "norm1", "norm2")
        return ".".join(path + ["weight" if leaf == "w" else "bias"]), transpose
    layer, kind = leaf.rsplit("_", 1)                     # qkv_w -> qkv, w
    return ".".join(path + [layer, "weight" if kind == "w" else "bias"]), kind == "w"


def load_params(model, flat):
    """Copy minivit's flat float32 parameters into the model (transposing dense kernels)."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in flat.items():
            name, transpose = torch_name(key)
            v = torch.from_numpy(np.ascontiguousarray(value.T if transpose else value))
            if tuple(state[name].shape) != tuple(v.shape):
                raise ValueError(f"{key} -> {name}: shape {tuple(v.shape)} != {tuple(state[name].shape)}")
            state[name].copy_(v)


def make_optimizer(model):
    """AdamW with decay only where minivit decays (ndim >= 2, not the position embedding or the class token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in ("pos_embed", "cls_token") else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    for p in decay + no_decay:        # create the moments now (PyTorch does it lazily): they belong to the base
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return opt


class TorchRunner:
    """One benchmark case in PyTorch eager; the same interface as minivit.bench.runner.MinivitRunner."""
    framework = "torch"

    def __init__(self, case, device="cpu", seed=0):
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
        if threads:
            torch.set_num_threads(threads)
        self.case, self.cfg = case, get_config(case.config)
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = TorchViT(self.cfg)
        load_params(self.model, flatten(bench_params(self.cfg, seed)))
        self.model.to(self.device)
        images, labels = bench_batch(self.cfg, case.batch, seed)
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.opt = make_optimizer(self.model) if case.train else None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.gpu_base = torch.cuda.memory_allocated()   # parameters, optimizer state, batch

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self):
        if self.case.train:
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(self.images), self.labels)
            loss.backward()
            self.opt.step()
        else:
            with torch.no_grad():
                self.model(self.images)
        self.sync()

    def device_memory(self):
        if self.device.type != "cuda":
            return {}
        return {"gpu_base_mb": self.gpu_base / 2 ** 20, "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
                "gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20}

    def check(self, path, tol=2e-3):
        """Load minivit's dump (parameters, batch, logits, gradients), recompute here, return the max relative
        differences (max |a - b| / max |b| per tensor; the worst tensor named)."""
        data = np.load(path)
        flat = {k[len("param."):]: data[k] for k in data.files if k.startswith("param.")}
        load_params(self.model, flat)
        self.model.zero_grad(set_to_none=True)
        x = torch.from_numpy(data["images"]).to(self.device)
        y = torch.from_numpy(data["labels"]).to(self.device)
        logits = self.model(x)
        F.cross_entropy(logits, y).backward()
        rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))   # noqa: E731
        out = {"logits_max_rel": rel(data["logits"], logits.detach().cpu().numpy())}
        params = dict(self.model.named_parameters())
        worst, worst_name = 0.0, None
        for key in flat:
            name, transpose = torch_name(key)
            g = params[name].grad.detach().cpu().numpy()
            r = rel(data["grad." + key], g.T if transpose else g)
            if r >= worst:
                worst, worst_name = r, key
        out.update(grads_max_rel=worst, grads_worst=worst_name, tolerance=tol,
                   ok=out["logits_max_rel"] <= tol and worst <= tol)
        return out
