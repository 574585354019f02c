"""``normfuse bench``: normfuse vs torch (eager and compiled) vs a memory copy, side by side.

Every repetition runs each contender once in turn and the table reports medians, so a noisy
neighbour slows all of them alike. GB/s counts the fewest bytes a kernel must move (forward:
read x, write y; forward+backward: also read x and dy, write dx).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import normfuse
from normfuse.cli import positive_int, say_if_overwriting


# glibc returns freed multi-MiB blocks to the OS (trim) or maps them fresh (mmap), so the next
# allocation of an output page-faults: about 20 ms per 128 MiB here, the same for every
# contender, and noise that swamps the kernels. Keeping freed memory in the process for the
# run isolates the kernels; a re-exec applies it before the allocator starts.
MALLOC_TUNABLES = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=4294967295"


# A numba kernel compiled in the running process was measured here to run 1.6-2x slower, for
# the life of that process, than the same kernel loaded from numba's on-disk cache by a fresh
# process (the backward, one thread or two; numba issue #10617 reports the same for parallel
# code). So a benchmark first runs itself once in this mode, to compile and cache every kernel
# it will time, and only the run after it measures.
_WARMUP_ONLY = "NORMFUSE_BENCH_WARMUP_ONLY"


def reexec_with_malloc_tunables(warm_first: bool = True) -> None:
    """Restart this very program with MALLOC_TUNABLES set (Linux, once; no-op elsewhere).

    ``warm_first``: before that, run the program once with ``interleaved_medians`` timing
    nothing (output discarded), so that the measured run loads every kernel from the cache.
    """
    if "GLIBC_TUNABLES" not in os.environ and sys.platform == "linux":
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        if warm_first:
            subprocess.run(
                [sys.executable, *sys.argv], env={**os.environ, _WARMUP_ONLY: "1"},
                stdout=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        os.execv(sys.executable, [sys.executable, *sys.argv])


class AutogradFloor(torch.autograd.Function):
    """The floor of any Python autograd op, for the host-time benchmarks (``benchmarks/
    host_overhead.py``, ``benchmarks/cold_costs_cpu.py``): saves two tensors, allocates its outputs
    (x-shaped, and two w-shaped gradients), computes nothing."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], reps: int, inner: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each contender, the contenders alternating every repetition.

    In a warm-up run (see ``reexec_with_malloc_tunables``) only the first calls are made, and
    every median is NaN.
    """
    for fn in contenders.values():  # warm-up: JIT, allocator, caches
        for _ in range(3):
            fn()
    sync()
    if os.environ.get(_WARMUP_ONLY):
        return {name: math.nan for name in contenders}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
# bytes moved per element of one activation tensor, at the least (reads plus writes):
# a norm reads x and writes y; its backward reads x and dy and writes dx. The add+norm step
# also reads the residual and writes the residual output, and its backward reads the gradient
# arriving at the residual output; the residual's gradient is x's (without dropout: the same
# values, one tensor, not written apart; 9 tensors were counted for add+norm before the
# twenty-fourth session, which the GB/s of earlier RESULTS.md sections use).
TENSORS_MOVED = {
    "layer_norm": {"fwd": 2, "f+b": 5},
    "rms_norm": {"fwd": 2, "f+b": 5},
    "add_layer_norm": {"fwd": 4, "f+b": 8},
    "add_rms_norm": {"fwd": 4, "f+b": 8},
}


def llama_rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm forward, as a plain torch composite (the common model code)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + (1e-6 if eps is None else eps))
    return weight * h.to(x.dtype)


def _torch_add_layer_norm(x, residual, normalized_shape, weight, bias):
    h = x + residual
    return F.layer_norm(h, normalized_shape, weight, bias), h


def _torch_add_rms_norm(x, residual, normalized_shape, weight, bias):
    h = x + residual
    return F.rms_norm(h, normalized_shape, weight), h


def implementations(op: str, compiled: bool) -> dict[str, Callable]:
    """name -> fn(x, residual, normalized_shape, weight, bias) returning a tensor or (out, residual_out)."""
    if op == "layer_norm":
        impls = {
            "normfuse": lambda x, r, s, w, b: normfuse.layer_norm(x, s, w, b),
            "torch": lambda x, r, s, w, b: F.layer_norm(x, s, w, b),
        }
        base = F.layer_norm
    elif op == "rms_norm":
        impls = {
            "normfuse": lambda x, r, s, w, b: normfuse.rms_norm(x, s, w),
            "torch": lambda x, r, s, w, b: F.rms_norm(x, s, w),
            "llama": lambda x, r, s, w, b: llama_rms_norm(x, s, w),
        }
        base = F.rms_norm
    elif op == "add_layer_norm":
        impls = {
            "normfuse": lambda x, r, s, w, b: normfuse.add_layer_norm(x, r, s, w, b),
            "torch": _torch_add_layer_norm,
        }
        base = _torch_add_layer_norm
    else:
        impls = {
            "normfuse": lambda x, r, s, w, b: normfuse.add_rms_norm(x, r, s, w),
            "torch": _torch_add_rms_norm,
        }
        base = _torch_add_rms_norm
    if compiled:
        compiled_base = torch.compile(base, dynamic=True)
        if op.startswith("add_"):
            impls["torch.compile"] = compiled_base
        elif op == "rms_norm":
            impls["torch.compile"] = lambda x, r, s, w, b: compiled_base(x, s, w)
        else:
            impls["torch.compile"] = lambda x, r, s, w, b: compiled_base(x, s, w, b)
    return impls


def contenders(
    op: str, rows: int, n: int, dtype: torch.dtype, device: str, impls: dict[str, Callable], floor: bool = False
) -> dict[str, Callable[[], object]]:
    """"copy" and, for each implementation, "<name> fwd" (no grad) and "<name> f+b"
    (forward, then ``torch.autograd.grad`` over every input: x, weight, bias, residual).

    ``floor`` adds "f+b floor": torch's own copies and adds into preallocated buffers, moving
    exactly the tensors a forward+backward must move (``TENSORS_MOVED``), each pass at memory
    speed, so the time no norm's forward+backward can beat without skipping a write's read.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    r = torch.randn(rows, n, generator=gen).to(dtype).to(device) if op.startswith("add_") else None
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype).to(device)
    b = (0.1 * torch.randn(n, generator=gen)).to(dtype).to(device) if "layer" in op else None
    dy = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    buf = torch.empty_like(x)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    wanted = tuple(t for t in leaves if t is not None)

    def fwd(fn):
        def call():
            with torch.no_grad():
                return fn(x, r, (n,), w, b)

        return call

    def fwd_bwd(fn):
        def call():
            out = fn(*leaves[:2], (n,), *leaves[2:])
            outs = out if isinstance(out, tuple) else (out,)
            return torch.autograd.grad(outs, wanted, (dy,) * len(outs))

        return call

    result: dict[str, Callable[[], object]] = {"copy": lambda: buf.copy_(x)}
    if floor:
        result["f+b floor"] = _floor_call(x, r, dy)
    for name, fn in impls.items():
        result[f"{name} fwd"] = fwd(fn)
        result[f"{name} f+b"] = fwd_bwd(fn)
    return result


def _floor_call(x: torch.Tensor, r: torch.Tensor | None, dy: torch.Tensor) -> Callable[[], None]:
    """A norm's forward+backward traffic in plain copies and adds: the forward reads x and writes
    the output (a copy), the backward reads x and dy and writes dx (an add into a buffer); the
    add+norm step also reads the residual and writes the residual output forward (a second
    copy), and its backward also reads the residual output's gradient (an addcmul of three
    tensors into a buffer: dx, which without dropout is the residual's gradient too, the same
    values in one tensor): 5 and 8 tensor passes."""
    bufs = [torch.empty_like(x) for _ in range(3)]
    if r is None:

        def call():
            bufs[0].copy_(x)
            torch.add(dy, x, out=bufs[1])

        return call

    def call_add():
        bufs[0].copy_(x)
        bufs[1].copy_(r)
        torch.addcmul(dy, x, r, out=bufs[2])

    return call_add


def machine_line(device: str) -> str:
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (
        f"CPU {cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}, "
        f"numba {numba.__version__}, normfuse {normfuse.__version__}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    if args.model is not None:
        return _run_models(args, console)
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("normfuse bench: error: --device cuda but no CUDA GPU is available")
        return 2
    features = [256, 1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    reps = 5 if args.quick else 15
    budget = args.mib * 2**20
    impls = implementations(args.op, compiled=not args.no_compile)
    moved_per_mode = TENSORS_MOVED[args.op]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    console.print(machine_line(args.device))
    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(features) * len(dtypes))
        for dtype in dtypes:
            es = torch.finfo(dtype).bits // 8
            for n in features:
                rows = max(1, budget // (n * es))
                progress.update(task, description=f"{str(dtype)[6:]} {rows}x{n}")
                try:
                    med = interleaved_medians(contenders(args.op, rows, n, dtype, args.device, impls), reps, 1, sync)
                except Exception as error:  # noqa: BLE001 - a compile failure on a shape is reported, not fatal
                    console.print(f"[yellow]{str(dtype)[6:]} {rows}x{n}: {type(error).__name__}: {error}[/yellow]")
                    progress.advance(task)
                    continue
                tensor_bytes = rows * n * es
                entry = {"dtype": str(dtype)[6:], "rows": rows, "n": n, "copy_ms": med["copy"] * 1e3,
                         "copy_gbs": 2 * tensor_bytes / med["copy"] / 1e9}  # fmt: skip
                for key, seconds in med.items():
                    if key == "copy":
                        continue
                    moved = moved_per_mode["fwd" if key.endswith("fwd") else "f+b"] * tensor_bytes
                    entry[key] = {"ms": seconds * 1e3, "gbs": moved / seconds / 1e9}
                results.append(entry)
                progress.advance(task)

    impls = list(impls)
    for mode in ("fwd", "f+b"):
        title = f"{args.op} {'forward' if mode == 'fwd' else 'forward + backward'}: ms (GB/s), median of {reps}"
        table = Table(title=title)
        for column in ("dtype", "rows x N", "copy", *impls, "normfuse speedup vs torch"):
            table.add_column(column, justify="right")
        for e in results:
            cells = [f"{e[f'{i} {mode}']['ms']:.3f} ({e[f'{i} {mode}']['gbs']:.0f})" for i in impls if f"{i} {mode}" in e]
            speedup = e[f"torch {mode}"]["ms"] / e[f"normfuse {mode}"]["ms"]
            table.add_row(e["dtype"], f"{e['rows']}x{e['n']}", f"{e['copy_ms']:.3f} ({e['copy_gbs']:.0f})", *cells, f"{speedup:.2f}x")
        console.print(table)

    if os.environ.get(_WARMUP_ONLY):
        return 0  # the warm-up run's medians are NaN: nothing to write
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bench.json", out / "bench.png"
    for path in (json_path, png_path):
        say_if_overwriting(path, console)
    summary = {"machine": machine_line(args.device), "device": args.device, "op": args.op, "results": results}
    json_path.write_text(json.dumps(summary, indent=1))
    _plot(png_path, results, impls, dtypes)
    console.print(f"[green]done.[/green] wrote {json_path}, {png_path}")
    return 0


def _plot(path: Path, results: list[dict], impls: list[str], dtypes: list[torch.dtype]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(dtypes), 2, figsize=(10, 3.4 * len(dtypes)), squeeze=False)
    for row, dtype in enumerate(dtypes):
        mine = [e for e in results if e["dtype"] == str(dtype)[6:]]
        ns = [e["n"] for e in mine]
        for col, mode in enumerate(("fwd", "f+b")):
            ax = axes[row][col]
            ax.plot(ns, [e["copy_gbs"] for e in mine], "k--", label="copy (ceiling)")
            for impl in impls:
                ax.plot(ns, [e[f"{impl} {mode}"]["gbs"] for e in mine if f"{impl} {mode}" in e], "o-", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("features")
            ax.set_ylabel("GB/s")
            ax.set_title(f"{str(dtype)[6:]} {'forward' if mode == 'fwd' else 'forward+backward'}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time normfuse against torch and a memory copy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--op", default="layer_norm", choices=OPS, help="which norm to time (default layer_norm)")
    p.add_argument("--model", choices=["llama", "gpt2", "bert", "bart"], default=None,
                   help="instead: a training step (forward, backward, AdamW) of a small Hugging Face model, "
                   "normfuse.patch-ed vs not (needs transformers)")
    p.add_argument("--fuse", action="store_true",
                   help="--model: patch with fuse_residual=True (bert, bart: and fuse_dropout=True)")
    p.add_argument("--width", type=positive_int, default=512, help="--model: hidden size (default 512)")
    p.add_argument("--layers", type=positive_int, default=4, help="--model: layers (default 4)")
    p.add_argument("--seq", type=positive_int, default=256, help="--model: sequence length (default 256)")
    p.add_argument("--batch", type=positive_int, default=4, help="--model: batch size (default 4)")
    p.add_argument("--quick", action="store_true", help="three feature sizes, fewer repetitions (under a minute)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes (default float32,bfloat16)")
    p.add_argument("--mib", type=positive_int, default=16, help="activation size per case in MiB (default 16)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (its first compile takes long)")
    p.add_argument("--out", default="normfuse-bench", help="directory for bench.json and bench.png")
    p.set_defaults(run=run)


def _run_models(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from normfuse.cli.bench_model import run_model_bench

    if importlib.util.find_spec("transformers") is None:
        console.print("normfuse bench: error: --model needs transformers (pip install 'normfuse[hf]')")
        return 2
    if args.device != "cpu":
        console.print("normfuse bench: error: --model runs on the CPU only for now")
        return 2
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    reps = 3 if args.quick else 7
    console.print(machine_line("cpu"))
    results = []
    for dtype in dtypes:
        console.print(f"{args.model} {str(dtype)[6:]}: width {args.width}, {args.layers} layers, "
                      f"batch {args.batch} x {args.seq} tokens, {reps} interleaved steps each ...")  # fmt: skip
        results.append(
            run_model_bench(args.model, args.width, args.layers, args.seq, args.batch, reps, dtype, console, args.fuse)
        )
    fused = " (fused residual adds)" if args.fuse else ""
    table = Table(title=f"training step of a {args.model}-shaped model{fused} (forward, backward, AdamW): medians")
    for column in ("dtype", "step s: torch / nf", "step speedup", "norm share: torch / nf", "share shrinks",
                   "saved MiB: torch / nf"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in results:
        step, share, saved = r["step_s"], r["norm_share"], r["saved_bytes"]
        table.add_row(
            r["dtype"], f"{step['torch']:.3f} / {step['normfuse']:.3f}", f"{step['torch'] / step['normfuse']:.2f}x",
            f"{share['torch']:.1%} / {share['normfuse']:.1%}" if share else "not measured",
            f"{share['torch'] / share['normfuse']:.1f}x" if share else "-",
            f"{saved['torch'] / 2**20:.0f} / {saved['normfuse'] / 2**20:.0f}",
        )  # fmt: skip
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_model_{args.model}{'_fused' if args.fuse else ''}.json"
    say_if_overwriting(path, console)
    path.write_text(json.dumps({"machine": machine_line("cpu"), "results": results}, indent=1))
    console.print(f"[green]done.[/green] wrote {path}")
    return 0
