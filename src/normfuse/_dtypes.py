"""Dtype facts shared by every layer (front end, ops and backends alike)."""

from __future__ import annotations

import torch

# The storage dtypes the kernels take; the front end refuses others with torch's error.
KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where statistics and reductions are computed: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
