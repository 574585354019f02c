"""``normfuse verify``: accuracy of normfuse and of torch against the float64 reference.

For each dtype and input family, the error of the output and of each gradient:
max |result - reference| / (1 + |reference|) for the output, ||result - reference|| / ||reference||
for the gradients. normfuse fails (exit status 1) where its error exceeds its bound.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import normfuse
from normfuse import reference
from normfuse.cli import say_if_overwriting

# normfuse's bounds: a few units of the dtype's last place for the output; the gradients are
# sums, so relative-norm bounds a little above the dtype's rounding of the stored result.
BOUNDS = {
    torch.float64: {"out": 1e-12, "dx": 1e-10, "dgamma": 1e-10, "dbeta": 1e-10},
    torch.float32: {"out": 2e-6, "dx": 2e-5, "dgamma": 2e-5, "dbeta": 2e-5},
    torch.bfloat16: {"out": 1.6e-2, "dx": 1e-2, "dgamma": 1e-2, "dbeta": 1e-2},
    torch.float16: {"out": 2e-3, "dx": 2e-3, "dgamma": 2e-3, "dbeta": 2e-3},
}


def cases(quick: bool) -> dict[str, tuple[int, int, float, float]]:
    """name -> (rows, features, offset, scale) of x = offset + scale * N(0, 1)."""
    many = 2048 if quick else 8192
    return {
        "plain": (256, 1024, 0.0, 1.0),
        "mean 1e4": (256, 1024, 1e4, 1.0),
        "mean 1e6": (64, 1024, 1e6, 1.0),
        "tiny scale 1e-3": (256, 1024, 0.0, 1e-3),
        "huge scale 1e4": (256, 1024, 0.0, 1e4),
        f"{many} rows (dgamma)": (many, 256, 0.0, 1.0),
    }


def _errors(fn, x, w, b, dy, ref):
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    out = fn(xg, (x.shape[1],), wg, bg)
    dx, dw, db = torch.autograd.grad(out, (xg, wg, bg), dy)
    ref_out, (rdx, rdw, rdb) = ref

    def rel_norm(a, r):
        return ((a.double().cpu() - r).norm() / r.norm()).item()

    out_err = ((out.detach().double().cpu() - ref_out).abs() / (1 + ref_out.abs())).max().item()
    return {"out": out_err, "dx": rel_norm(dx, rdx), "dgamma": rel_norm(dw, rdw), "dbeta": rel_norm(db, rdb)}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("normfuse verify: error: --device cuda but no CUDA GPU is available")
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    report, failures = [], 0
    table = Table(title="error against the float64 reference: normfuse / torch (bound)")
    for column in ("dtype", "input", "output", "dx", "dgamma", "dbeta", "ok"):
        table.add_column(column, justify="right")
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    for dtype in dtypes:
        for name, (rows, n, offset, scale) in cases(args.quick).items():
            if dtype in (torch.float16, torch.bfloat16) and (offset >= 1e4 or scale >= 1e4):
                continue  # not representable to a useful precision in 16 bits (fp16 overflows)
            x64 = offset + scale * torch.randn(rows, n, generator=gen, dtype=torch.float64)
            x = x64.to(dtype)
            w = (1 + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
            b = (0.2 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
            dy = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
            ref = (reference.layer_norm(x, (n,), w, b), reference.layer_norm_backward(dy, x, (n,), w))
            on = [t.to(args.device) for t in (x, w, b, dy)]
            ours = _errors(normfuse.layer_norm, *on, ref)
            theirs = _errors(F.layer_norm, *on, ref)
            # the float64 reference itself rounds like float64 arithmetic, its error growing with
            # the condition number |mean| / spread: allowed for on top of normfuse's own bound
            reference_error = 1e-15 * (1 + abs(offset) / scale)
            bound = {k: v + reference_error for k, v in BOUNDS[dtype].items()}
            ok = all(ours[k] <= bound[k] for k in bound)
            failures += not ok
            report.append({"dtype": str(dtype)[6:], "input": name, "normfuse": ours, "torch": theirs, "bound": bound, "ok": ok})
            table.add_row(
                str(dtype)[6:], name,
                *(f"{ours[k]:.1e} / {theirs[k]:.1e} ({bound[k]:.0e})" for k in ("out", "dx", "dgamma", "dbeta")),
                "[green]yes[/green]" if ok else "[red]NO[/red]",
            )  # fmt: skip
    console.print(table)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        say_if_overwriting(path, console)
        path.write_text(json.dumps(report, indent=1))
        console.print(f"wrote {path}")
    if failures:
        console.print(f"[red]{failures} case(s) over normfuse's bound[/red]")
        return 1
    console.print("[green]every case within normfuse's bounds[/green]")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="accuracy report against the float64 reference; fails over the bounds",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--quick", action="store_true", help="fewer rows in the dgamma case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report as JSON to this file")
    p.set_defaults(run=run)
