"""Host time of an eager training call on the CPU, around its kernels: warm, and with the caches
emptied before each call as a large kernel empties them.

    python benchmarks/overhead_cpu.py [--shape 4x64] [--rounds 400]

For a small LayerNorm input (so that the kernels themselves take little time) it times, call by
call and median over the rounds: normfuse's forward (the output recorded for autograd) and its
backward (``torch.autograd.grad`` over x, weight and bias), the CPU backend's kernel calls alone
(``backends.cpu.norm_fwd`` / ``norm_bwd`` with the same arguments), and torch's forward and
backward. normfuse minus its kernel calls is the Python around them (front end, autograd
Function, launchers). "cold": a 48 MiB copy runs before each timed call, so that the call finds
its code and data out of cache, as every call of a training step does after the previous
kernel's rows went through the caches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normfuse
from normfuse.backends import cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4x64")
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    rows, n = (int(v) for v in args.shape.split("x"))
    dtype = torch.float32
    xl, wl, bl = (torch.randn(*s).requires_grad_() for s in ((rows, n), (n,), (n,)))
    x, w, b = xl.detach(), wl.detach(), bl.detach()
    dy = torch.randn(rows, n)
    big = torch.empty(48 << 20, dtype=torch.uint8)
    big_out = torch.empty_like(big)

    def kernel_fwd():
        return cpu.norm_fwd(x, w, b, 1e-5, False)

    def kernel_bwd(mean, rstd):
        return cpu.norm_bwd(dy, x, w, mean, rstd, False, True, True, True, x_dtype=dtype, dweight_dtype=dtype,
                            dbias_dtype=dtype)  # fmt: skip

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {rows}x{n} fp32, medians of "
          f"{args.rounds} calls, us")  # fmt: skip
    print(f"{'':>5} | {'normfuse fwd':>12} {'bwd':>6} | {'kernels fwd':>11} {'bwd':>6} | {'torch fwd':>9} {'bwd':>6} | "
          f"{'around kernels: fwd':>19} {'bwd':>6}")  # fmt: skip
    for cold in (False, True):
        samples: dict[str, list[float]] = {k: [] for k in ("nf fwd", "nf bwd", "k fwd", "k bwd", "t fwd", "t bwd")}

        def timed(key, fn):
            if cold:
                big_out.copy_(big)
            start = time.perf_counter()
            result = fn()
            samples[key].append(time.perf_counter() - start)
            return result

        for i in range(args.rounds + 20):
            y = timed("nf fwd", lambda: normfuse.layer_norm(xl, (n,), wl, bl))
            timed("nf bwd", lambda: torch.autograd.grad(y, (xl, wl, bl), dy))
            _, _, mean, rstd, _ = timed("k fwd", kernel_fwd)
            timed("k bwd", lambda: kernel_bwd(mean, rstd))
            yt = timed("t fwd", lambda: torch.nn.functional.layer_norm(xl, (n,), wl, bl))
            timed("t bwd", lambda: torch.autograd.grad(yt, (xl, wl, bl), dy))
            if i < 20:  # warm-up
                for v in samples.values():
                    v.clear()
        us = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
        print(f"{'cold' if cold else 'warm':>5} | {us['nf fwd']:12.1f} {us['nf bwd']:6.1f} | {us['k fwd']:11.1f} "
              f"{us['k bwd']:6.1f} | {us['t fwd']:9.1f} {us['t bwd']:6.1f} | {us['nf fwd'] - us['k fwd']:19.1f} "
              f"{us['nf bwd'] - us['k bwd']:6.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
