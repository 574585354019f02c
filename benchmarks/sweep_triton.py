"""Launch-setting sweep for the Triton kernels, side by side on one GPU (256 MiB activations).

    python benchmarks/sweep_triton.py [--wide | --narrow | --fwd]

Without options: the backward (the fused kernel and the looped one for wide rows) over warps per
program and programs per SM, and the looped forward over chunk size and warps. ``--wide``: only
rows wider than ``MAX_FUSED_N_BWD``: the looped backward against the split one (row sums, then a
grid of column blocks and row groups) over its block shape, warps and programs per SM, and at
16384 features the one-pass kernel with the whole row in registers. ``--narrow``: rows of
256-2048 features, forward and backward over the tile (rows per program step, in elements),
warps and the backward's programs per SM. ``--fwd``: the forward of wide rows: warps for rows held
in registers, warps and chunk for the looped forward (the first line of each shape: the defaults).
Prints GB/s (fewest bytes: backward reads x and dy and writes dx; forward reads x and writes y)
and the fraction of a device-to-device copy measured in the same run. The winners go into
``TUNING`` in ``normfuse/backends/triton.py``.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from normfuse.backends import triton as tb

SIZE = 256 * 2**20


def _tensors(n: int, dtype: torch.dtype):
    """(x, w, dy, copy GB/s): 256 MiB rows of n, and a device-to-device copy of x timed now."""
    m = SIZE // (n * torch.finfo(dtype).bits // 8)
    x = torch.randn(m, n, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    buf = torch.empty_like(x)
    copy_gbs = 2 * x.numel() * x.element_size() / do_bench(lambda: buf.copy_(x), return_mode="median") / 1e6
    return x, w, torch.randn_like(x), copy_gbs


def _set(max_fused_n_bwd: int | None = None, **settings) -> None:
    tb.TUNING.update(settings)
    tb.MAX_FUSED_N_BWD = max_fused_n_bwd or _DEFAULT_MAX_FUSED_N_BWD
    tb.clear_config_caches()


_DEFAULT_MAX_FUSED_N_BWD = tb.MAX_FUSED_N_BWD


def wide_backward(default: dict) -> None:
    """Rows wider than MAX_FUSED_N_BWD: looped vs split backward, side by side."""
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for n in (16384, 32768, 65536):
            x, w, dy, copy_gbs = _tensors(n, dtype)
            _, _, mean, rstd, _ = tb.norm_fwd(x, w, w, 1e-5, False)
            # the whole row in registers, one pass over x and dy: 16384 features are 32 elements
            # a thread over 16 warps, 16 over 32 warps (x, dy, weight and two accumulators each)
            fused = [dict(max_fused_n_bwd=n, bwd_warps=wp, bwd_programs_per_sm=ps)
                     for wp, ps in itertools.product((16, 32), (1, 2)) if n <= 16384]  # fmt: skip
            settings = fused + [dict(bwd_wide="looped")] + [
                dict(bwd_wide="split", split_block_n=bn, split_block_m=bm, split_warps=wp, split_programs_per_sm=ps)
                for bn, bm, wp, ps in itertools.product((256, 512, 1024), (4, 8), (4, 8), (2, 4, 8))
                if bn * bm <= 8192
            ]  # fmt: skip
            for setting in settings:
                _set(**{**default, **setting})
                ms = do_bench(lambda: tb.norm_bwd(dy, x, w, mean, rstd, False, True, True, True), return_mode="median")
                gbs = 3 * x.numel() * es / ms / 1e6
                label = " ".join(f"{k.removeprefix('split_')}={v}" for k, v in setting.items()).replace("max_fused_n_bwd", "fused")
                print(f"wide bwd {str(dtype)[6:]:>8} n={n:>6} {label:<60} | {gbs:6.0f} GB/s {gbs / copy_gbs:6.1%} of copy",
                      flush=True)  # fmt: skip
            _set(**default)
            del x, w, dy, mean, rstd
            torch.cuda.empty_cache()


def narrow_rows(default: dict) -> None:
    """Narrow rows: rows per program step (the tile, in elements) and warps, forward and backward."""
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for n in (256, 512, 1024, 2048):
            x, w, dy, copy_gbs = _tensors(n, dtype)
            _, _, mean, rstd, _ = tb.norm_fwd(x, w, w, 1e-5, False)
            for tile, warps, per_sm in itertools.product((2048, 4096, 8192), (4, 8), (4, 8)):
                _set(fwd_tile=tile, bwd_tile=tile, bwd_tile_fp32_256=tile, fwd_warps=warps, bwd_warps=warps,
                     bwd_programs_per_sm=per_sm)  # fmt: skip
                fwd_ms = do_bench(lambda: tb.norm_fwd_inference(x, x.shape[0], n, w, w, 1e-5, False), return_mode="median")
                bwd_ms = do_bench(lambda: tb.norm_bwd(dy, x, w, mean, rstd, False, True, True, True), return_mode="median")
                fwd, bwd = 2 * x.numel() * es / fwd_ms / 1e6, 3 * x.numel() * es / bwd_ms / 1e6
                print(f"narrow {str(dtype)[6:]:>8} n={n:>5} tile={tile:>5} warps={warps} programs/SM={per_sm} | fwd {fwd / copy_gbs:6.1%} "
                      f"bwd {bwd / copy_gbs:6.1%} of copy", flush=True)  # fmt: skip
            _set(**default)
            del x, w, dy, mean, rstd
            torch.cuda.empty_cache()


def wide_forward(default: dict) -> None:
    """Forward of wide rows: warps for rows held whole in registers (4096-16384 features, and
    32768 with 4-byte elements), the looped forward's warps and chunk (32768 bf16, 65536)."""
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for n in (4096, 8192, 16384, 32768, 65536):
            x, w, _, copy_gbs = _tensors(n, dtype)
            if n <= tb.max_fused_n(es):
                warps = (16, 32) if n > 16384 else (4, 8, 16)
                settings = [dict(fwd_warps=wp) for wp in warps]
            else:
                settings = [dict(loop_warps=wp, loop_block_n=bn) for wp, bn in itertools.product((8, 16, 32), (4096, 8192, 16384))]
            for setting in [{}] + settings:
                _set(**{**default, **setting})
                ms = do_bench(lambda: tb.norm_fwd_inference(x, x.shape[0], n, w, w, 1e-5, False), return_mode="median")
                gbs = 2 * x.numel() * es / ms / 1e6
                kind = "held" if n <= tb.max_fused_n(es) else "looped"
                label = " ".join(f"{k}={v}" for k, v in setting.items()) or "default"
                print(f"fwd {str(dtype)[6:]:>8} n={n:>6} {kind:>6} {label:<30} | {gbs:6.0f} GB/s {gbs / copy_gbs:6.1%} of copy",
                      flush=True)  # fmt: skip
            _set(**default)
            del x, w
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wide", action="store_true", help="only the wide-row backward: looped vs split")
    parser.add_argument("--narrow", action="store_true", help="only narrow rows: tile size and warps")
    parser.add_argument("--fwd", action="store_true", help="only the forward of wide rows: warps, fused or looped")
    args = parser.parse_args()
    default = dict(tb.TUNING)
    print(f"device {torch.cuda.get_device_name()}, defaults {default}")
    if args.wide:
        wide_backward(default)
    if args.narrow:
        narrow_rows(default)
    if args.fwd:
        wide_forward(default)
    if args.wide or args.narrow or args.fwd:
        return
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for n in (1024, 4096, 8192, 16384, 65536):
            x, w, dy, copy_gbs = _tensors(n, dtype)
            _, _, mean, rstd, _ = tb.norm_fwd(x, w, w, 1e-5, False)
            bwd_bytes = 3 * x.numel() * es
            fused = n <= tb.MAX_FUSED_N_BWD
            blocks = (None,) if fused else (2048, 4096, 8192)
            for num_warps, per_sm, block in itertools.product((4, 8, 16), (1, 2, 4), blocks):
                _set(bwd_warps=num_warps, bwd_programs_per_sm=per_sm, bwd_loop_warps=num_warps,
                     bwd_loop_block_n=block or default["bwd_loop_block_n"])  # fmt: skip
                ms = do_bench(lambda: tb.norm_bwd(dy, x, w, mean, rstd, False, True, True, True), return_mode="median")
                gbs = bwd_bytes / ms / 1e6
                print(
                    f"bwd {str(dtype)[6:]:>8} n={n:>6} warps={num_warps:>2} programs/SM={per_sm} "
                    f"block={block or '-':>5} | {gbs:6.0f} GB/s {gbs / copy_gbs:6.1%} of copy",
                    flush=True,
                )
            _set(**default)
            if n > tb.max_fused_n(es):
                for num_warps, block in itertools.product((4, 8, 16), (2048, 4096, 8192)):
                    _set(loop_warps=num_warps, loop_block_n=block)
                    ms = do_bench(lambda: tb.norm_fwd_inference(x, x.shape[0], n, w, w, 1e-5, False), return_mode="median")
                    gbs = 2 * x.numel() * es / ms / 1e6
                    print(
                        f"fwd {str(dtype)[6:]:>8} n={n:>6} warps={num_warps:>2} block={block:>5} | "
                        f"{gbs:6.0f} GB/s {gbs / copy_gbs:6.1%} of copy",
                        flush=True,
                    )
                _set(**default)
            del x, w, dy, mean, rstd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
