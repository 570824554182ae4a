"""The command line: `minivit COMMAND ...` (or `python -m minivit COMMAND ...`).

Each command is a small function that parses nothing itself: `build_parser` declares every flag in one place,
and the command functions call the package. Model code never prints; this module does.
"""
import argparse
import sys

import numpy as np


def cmd_gradcheck(args):
    """Whole-model gradient check: one row per tensor, exit status 1 on any failure."""
    from minivit.config import get_config
    from minivit.gradcheck import gradcheck_model

    cfg = get_config(args.config, pooling=args.pooling, gelu=args.gelu)
    if args.dropout:
        cfg = cfg.replace(dropout=0.1, attn_dropout=0.1, drop_path=0.1)
    print(f"gradient check of the whole ViT, config {args.config!r}: {cfg.depth} blocks, width {cfg.width}, "
          f"{cfg.heads} heads, pooling {cfg.pooling}, GELU {cfg.gelu}, dropout {'on (fixed mask)' if args.dropout else 'off'}")
    print(f"float64 central differences (eps {args.eps:g}) on the loss, relative error "
          f"||num - ana|| / max(||num||, ||ana||), tolerance {args.tol:g}\n")
    results = gradcheck_model(cfg, seed=args.seed, train=args.dropout, eps=args.eps, max_coords=args.max_coords,
                              device=args.device)
    width = max(len(r.name) for r in results)
    print(f"{'tensor':<{width}}  {'shape':<16} {'checked':>7}  {'rel error':>10}  result")
    failed = 0
    for r in results:
        ok = r.passed(args.tol)
        failed += not ok
        print(f"{r.name:<{width}}  {str(r.shape):<16} {r.checked:>7}  {r.rel_error:>10.2e}  {'pass' if ok else 'FAIL'}")
    worst = max(results, key=lambda r: r.rel_error)
    print(f"\n{len(results)} tensors, {failed} failed; worst {worst.name} at {worst.rel_error:.2e}")
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minivit", description="The Vision Transformer from scratch in NumPy/CuPy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("gradcheck", help="check every gradient of the whole model against finite differences",
                       description="Whole-model gradient check in float64: central differences against the "
                                   "hand-written backward pass, one row per parameter tensor and for the input "
                                   "images. Exits with status 1 if any tensor fails.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="test", help="named model config (small ones only: every check is a "
                                                    "pair of forward passes per coordinate)")
    p.add_argument("--pooling", choices=["token", "gap"], default="token")
    p.add_argument("--gelu", choices=["tanh", "exact"], default="tanh")
    p.add_argument("--dropout", action="store_true", help="check with dropout and stochastic depth on (fixed mask)")
    p.add_argument("--eps", type=float, default=1e-5, help="finite-difference step")
    p.add_argument("--tol", type=float, default=1e-6, help="largest relative error that passes")
    p.add_argument("--max-coords", type=int, default=32, help="coordinates sampled per tensor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="array backend (default: $MINIVIT_DEVICE or cpu)")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"minivit {args.command}: error: {e}", file=sys.stderr)
        return 2
