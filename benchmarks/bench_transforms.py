"""normfuse against torch under torch.func transforms and forward-mode AD, on the CPU.

    python benchmarks/bench_transforms.py [--shape 64x128x768] [--reps 15]

Times, interleaved (medians, ms), LayerNorm with a weight and a bias over the last dim of a
(B, T, N) float32 tensor:

- vmap:             ``vmap(layer_norm)`` over B (normfuse: one kernel call over B*T rows)
- per-sample grads: ``vmap(grad(loss, argnums=weight))`` over B, the weight's gradient per sample
- jvp:              ``torch.func.jvp`` of the forward

Under a transform normfuse takes its gradients from differentiable torch formulas (functorch
differentiates them again), so per-sample gradients are expected to trail torch's fused
backward; this script says by how much.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import normfuse
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables


def contenders(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict:
    n = x.shape[-1]
    fns = {"torch": F.layer_norm, "normfuse": normfuse.layer_norm}
    out = {}
    for name, ln in fns.items():

        def loss(u, weight, ln=ln):
            return ln(u, (n,), weight, b).square().sum()

        out[f"vmap {name}"] = lambda ln=ln: torch.func.vmap(lambda u: ln(u, (n,), w, b))(x)
        out[f"per-sample grads {name}"] = lambda loss=loss: torch.func.vmap(
            torch.func.grad(loss, argnums=1), in_dims=(0, None)
        )(x, w)
        out[f"jvp {name}"] = lambda ln=ln: torch.func.jvp(lambda u: ln(u, (n,), w, b), (x,), (x.cos(),))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="64x128x768")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    reexec_with_malloc_tunables()
    batch, rows, n = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    x, w, b = torch.randn(batch, rows, n), torch.randn(n), torch.randn(n)
    med = interleaved_medians(contenders(x, w, b), args.reps, 1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.shape} float32; ms, medians")
    for what in ("vmap", "per-sample grads", "jvp"):
        t, nf = med[f"{what} torch"] * 1e3, med[f"{what} normfuse"] * 1e3
        print(f"{what:>17} | torch {t:8.2f} | normfuse {nf:8.2f} | torch / normfuse {t / nf:5.2f}x")


if __name__ == "__main__":
    main()
