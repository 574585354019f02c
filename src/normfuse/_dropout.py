"""The dropout mask as a function of (seed, row, column): one definition for every backend.

Kernels do not store the mask: forward and backward both compute, for element (i, j) of a
(rows, n) tensor, a 32-bit hash of the seed, the row and the column, and keep the element
when its top 24 bits fall below ``threshold(p)``. The seed is drawn from torch's default
generator, so ``torch.manual_seed`` reproduces a run. The numba kernels, the Triton kernels and
``keep_mask`` below compute the same bits, so every backend drops the same elements.

Why a hash and not a stored mask: torch's own Bernoulli mask costs about 6 ns per element here
(26 ms for 4096x1024 on 2 cores, 50x a copy of the tensor), and a stored mask adds a byte per
element to both passes; the hash is a few integer multiplies per element inside the kernels
that already read the row (measured in benchmarks/RESULTS.md).

Hash: murmur3's 32-bit finalizer ``fmix32``; ``row_key = fmix32(seed_lo ^ fmix32(i * 0x9E3779B1
+ seed_hi))`` once per row, then ``fmix32(row_key ^ (j * 0x85EBCA77))`` per element (odd
multipliers: distinct columns give distinct inputs).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROW_MULTIPLIER = 0x9E3779B1
COL_MULTIPLIER = 0x85EBCA77
FMIX_1 = 0x85EBCA6B
FMIX_2 = 0xC2B2AE35
KEEP_BITS = 24


def threshold(p: float) -> int:
    """Elements whose top 24 hash bits are below this are kept: round((1 - p) * 2^24)."""
    return int(round((1.0 - p) * (1 << KEEP_BITS)))


def scale(p: float) -> float:
    """Kept values are multiplied by 1 / (1 - p); with p = 1 nothing is kept and the scale is 0."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def split_seed(seed: int) -> tuple[int, int]:
    return seed & MASK32, (seed >> 32) & MASK32


def draw_seed(device: torch.device | None = None) -> torch.Tensor:
    """A 62-bit seed from torch's default CPU generator, as a 0-d int64 tensor (traceable)."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * FMIX_1) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_2) & MASK32
    return h ^ (h >> 16)


def keep_mask(
    seed: int | torch.Tensor, p: float, n_rows: int, n: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The (n_rows, n) boolean mask the kernels use, computed with torch int64 ops. ``seed``: an
    int, or the 0-d int64 tensor ``draw_seed`` gives, taken as it is (no ``int()``, which
    torch.compile cannot trace through: a compiled backward over one feature with dropout failed
    on it)."""
    lo, hi = split_seed(seed)
    rows = torch.arange(n_rows, dtype=torch.int64, device=device)
    cols = torch.arange(n, dtype=torch.int64, device=device)
    row_key = _fmix32(lo ^ _fmix32((rows * ROW_MULTIPLIER + hi) & MASK32))
    h = _fmix32(row_key[:, None] ^ ((cols * COL_MULTIPLIER) & MASK32)[None, :])
    return (h >> (32 - KEEP_BITS)) < threshold(p)
