"""What each layer and each piece of an eager CPU training call costs once a kernel has emptied
the caches, next to its warm cost.

    python benchmarks/cold_costs_cpu.py [--rounds 200]

"cold": a 48 MiB copy runs before each timed call, as a norm's kernel streams its rows through
the caches before the Python after it runs (and the previous op's before the Python ahead of
it). On a 4×64 fp32 input, so that the kernels themselves take next to no time, it times:

- the layers of a LayerNorm forward and its backward (``torch.autograd.grad``): the public
  function, the direct training path (``ops.eager_training_direct``), ``ops.NormFunction``
  itself, an ``autograd.Function`` that only allocates its outputs (the floor of any Python
  autograd op), and the CPU backend's calls alone;
- single pieces the launchers and the front end are made of (an allocation, a tensor property,
  numba's thread count, the direct path's test, ...).

Medians over the rounds, microseconds. The machine is shared: compare figures of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch

import normfuse
from normfuse import functional, ops
from normfuse.backends import _buffers, cpu
from normfuse.cli.bench import AutogradFloor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    rows, n = 4, 64
    xl, wl, bl = (torch.randn(*s).requires_grad_() for s in ((rows, n), (n,), (n,)))
    x, w, b = xl.detach(), wl.detach(), bl.detach()
    dy = torch.randn(rows, n)
    big = torch.empty(48 << 20, dtype=torch.uint8)
    big_out = torch.empty_like(big)
    layers = {
        "normfuse.layer_norm": lambda: normfuse.layer_norm(xl, (n,), wl, bl),
        "ops.eager_training_direct": lambda: ops.eager_training_direct(xl, n, wl, bl, 1e-5, False),
        "ops.NormFunction.apply": lambda: ops.NormFunction.apply(
            xl, None, wl, bl, 1e-5, False, None, 0.0, None, False, None, None, (rows, n)
        )[0],
        "an empty autograd.Function": lambda: AutogradFloor.apply(xl, wl, bl),
    }
    device = x.device
    pieces = {
        "torch.empty(shape, dtype=, device=)": lambda: torch.empty((rows, n), dtype=torch.float32, device=device),
        "torch.empty_like": lambda: torch.empty_like(x),
        "fwd_buffers (3 allocations)": lambda: _buffers.fwd_buffers(x, None, False, False, None),
        "tensor.data_ptr()": lambda: x.data_ptr(),
        "tensor.device": lambda: x.device,
        "torch.get_num_threads()": torch.get_num_threads,
        "numba.get_num_threads()": numba.get_num_threads,
        "cpu._use_threads(4M elements)": lambda: cpu._use_threads(1 << 22),
        "functional._direct_path": lambda: functional._direct_path(xl, (n,), wl, bl),
        "ops._eager_untransformed()": ops._eager_untransformed,
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "ops.backend_for(x)": lambda: ops.backend_for(x),
    }

    def timed(fn, cold: bool) -> tuple[object, float]:
        if cold:
            big_out.copy_(big)
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {rows}x{n} fp32, "
          f"medians of {args.rounds}, us")  # fmt: skip
    for cold in (False, True):
        fwd: dict[str, list[float]] = {k: [] for k in (*layers, "backend calls alone")}
        bwd: dict[str, list[float]] = {k: [] for k in fwd}
        piece: dict[str, list[float]] = {k: [] for k in pieces}
        for i in range(args.rounds + 20):
            keep = i >= 20  # warm-up rounds
            for name, fn in layers.items():
                y, t_fwd = timed(fn, cold)
                _, t_bwd = timed(lambda: torch.autograd.grad(y, (xl, wl, bl), dy), cold)
                if keep:
                    fwd[name].append(t_fwd)
                    bwd[name].append(t_bwd)
            (_, _, mean, rstd, _), t_fwd = timed(lambda: cpu.norm_fwd(x, w, b, 1e-5, False), cold)
            _, t_bwd = timed(lambda: cpu.norm_bwd(dy, x, w, mean, rstd, False, True, True, True), cold)
            for name, fn in pieces.items():
                _, t = timed(fn, cold)
                if keep:
                    piece[name].append(t)
            if keep:
                fwd["backend calls alone"].append(t_fwd)
                bwd["backend calls alone"].append(t_bwd)
        print("cold" if cold else "warm")
        for name in fwd:
            print(f"  {name:38s} forward {statistics.median(fwd[name]) * 1e6:7.1f}   "
                  f"backward {statistics.median(bwd[name]) * 1e6:7.1f}")  # fmt: skip
        for name, samples in piece.items():
            print(f"  {name:38s} {statistics.median(samples) * 1e6:7.1f}")


if __name__ == "__main__":
    main()
