"""The ``coatnet`` command line. Each subcommand is a small function; bad input exits with status 2
and one line on stderr that says what was wrong, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _pct(p: float | None) -> str:
    return "-" if p is None else f"{p:+.1f}%"


def cmd_info(args: argparse.Namespace) -> int:
    from .complexity import measure
    from .models import list_models

    rows = [measure(name, args.img_size) for name in (args.models or list_models())]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    header = ("model", "layout", "img", "params", "paper", "diff", "FLOPs", "paper", "diff")
    table = [header] + [(r.model, r.layout, str(r.img_size), _si(r.params), _si(r.paper_params), _pct(r.params_diff),
                         _si(r.flops), _si(r.paper_flops), _pct(r.flops_diff)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print("FLOPs are multiply-adds (the paper's convention); paper figures: Tables 3-5, 13, 14.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatnet", description="CoAtNet (Dai et al., NeurIPS 2021) in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters and FLOPs of models beside the paper's figures")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model names (default: all registered models)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: each model's own)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, exit status 2
        print(f"coatnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coatnet {args.command}: interrupted", file=sys.stderr)
        return 130
