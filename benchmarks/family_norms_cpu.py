"""The model-family RMSNorm formulas that ``normfuse.patch`` swaps: normfuse's options against the
formulas as the Hugging Face classes write them in torch, and what a token costs.

Throughput: the Llama formula (``w * (f32(x) * r).to(x.dtype)``, 145 classes of transformers
5.25) and DeepSeek-V4's unweighted one (``x * r.to(x.dtype)``) as plain torch code against
``rms_norm(..., xhat_dtype=x.dtype)`` and ``rms_norm(..., rstd_dtype=x.dtype)``, forward and
forward+backward (``torch.autograd.grad`` over x, and the weight where there is one), with a
copy of the tensor into a preallocated buffer for scale; medians in ms of calls interleaved
round by round, with glibc's malloc told to keep freed memory mapped (as ``bench_cpu.py``).

Latency (token-at-a-time decoding, nothing requires grad): torch's ``F.rms_norm``, normfuse's
``rms_norm`` without and with each option, and ``LlamaRMSNorm`` unpatched and patched, in us.

    python benchmarks/family_norms_cpu.py [--rounds 25] [--latency-only | --throughput-only]
"""

from __future__ import annotations

import argparse

import torch

import normfuse
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables

EPS = 1e-6


def llama(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def deepseek_v4(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + EPS).to(x.dtype)


def _throughput_contenders(x: torch.Tensor, w: torch.Tensor) -> dict:
    n, dtype = x.shape[-1], x.dtype
    buf = torch.empty_like(x)
    xg, wg, dy = x.clone().requires_grad_(), w.clone().requires_grad_(), torch.randn_like(x)

    def grads(out, inputs):
        return torch.autograd.grad(out, inputs, dy)

    return {
        "copy": lambda: buf.copy_(x),
        "llama torch fwd": lambda: llama(x, w),
        "llama nf fwd": lambda: normfuse.rms_norm(x, (n,), w, EPS, xhat_dtype=dtype),
        "llama torch f+b": lambda: grads(llama(xg, wg), (xg, wg)),
        "llama nf f+b": lambda: grads(normfuse.rms_norm(xg, (n,), wg, EPS, xhat_dtype=dtype), (xg, wg)),
        "deepseek torch fwd": lambda: deepseek_v4(x),
        "deepseek nf fwd": lambda: normfuse.rms_norm(x, (n,), None, EPS, rstd_dtype=dtype),
        "deepseek torch f+b": lambda: grads(deepseek_v4(xg), xg),
        "deepseek nf f+b": lambda: grads(normfuse.rms_norm(xg, (n,), None, EPS, rstd_dtype=dtype), xg),
    }


def throughput(rounds: int) -> None:
    print("throughput, ms (ratio: the torch formula's time / normfuse's)")
    for shape in [(4096, 1024), (1024, 4096)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(shape).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[1])).to(dtype)
            medians = interleaved_medians(_throughput_contenders(x, w), rounds, 3)
            ms = {name: seconds * 1e3 for name, seconds in medians.items()}
            print(f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.'):9s} copy {ms['copy']:.3f}")
            for family in ("llama", "deepseek"):
                for kind in ("fwd", "f+b"):
                    t, nf = ms[f"{family} torch {kind}"], ms[f"{family} nf {kind}"]
                    print(f"    {family:8s} {kind}: torch {t:8.3f}  normfuse {nf:7.3f}  {t / nf:5.2f}x"
                          f"  normfuse/copy {nf / ms['copy']:.2f}")  # fmt: skip


def _latency_contenders(x: torch.Tensor, w: torch.Tensor) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    n, dtype = x.shape[-1], x.dtype
    unpatched = LlamaRMSNorm(n, eps=EPS).to(dtype)
    patched = torch.nn.Sequential(LlamaRMSNorm(n, eps=EPS).to(dtype))
    normfuse.patch(patched)
    return {
        "F.rms_norm": lambda: torch.nn.functional.rms_norm(x, (n,), w, EPS),
        "rms_norm": lambda: normfuse.rms_norm(x, (n,), w, EPS),
        "xhat_dtype": lambda: normfuse.rms_norm(x, (n,), w, EPS, xhat_dtype=dtype),
        "weight_offset": lambda: normfuse.rms_norm(x, (n,), w, EPS, weight_offset=1.0),
        "rstd_dtype": lambda: normfuse.rms_norm(x, (n,), None, EPS, rstd_dtype=dtype),
        "Llama": lambda: unpatched(x),
        "Llama patched": lambda: patched(x),
    }


def latency(rounds: int) -> None:
    print("latency, us a call (nothing requires grad)")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(1, 4096), (8, 768)]:
            x = torch.randn(shape).to(dtype)
            w = torch.randn(shape[1]).to(dtype)
            with torch.no_grad():
                us = interleaved_medians(_latency_contenders(x, w), rounds * 8, 20)
            print(f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.'):9s} "
                  + "  ".join(f"{name} {s * 1e6:.1f}" for name, s in us.items()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--latency-only", action="store_true")
    group.add_argument("--throughput-only", action="store_true")
    args = parser.parse_args()
    reexec_with_malloc_tunables()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.latency_only:
        throughput(args.rounds)
    if not args.throughput_only:
        latency(args.rounds)


if __name__ == "__main__":
    main()
