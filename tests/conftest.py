import os

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be
# chosen before triton compiles anything, so here, before any test imports the backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter's fp32 -> bf16 cast truncates; a GPU's rounds to nearest even, and that is
    # what the Triton tests check (backends/triton.py says how)
    from normfuse.backends import triton as _triton_backend

    _triton_backend.interpreter_rounds_bf16_like_gpus()

# The CPU launchers call kernels by a key standing for their signature (backends/cpu.py,
# _EntryPoints): every kernel call of the suite checks that each key stands for one signature.
os.environ.setdefault("NORMFUSE_CHECK_KERNEL_KEYS", "1")

# Hypothesis: few examples by default (CI time), more with HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test taking ``device`` runs on the CPU and, where there is one, on the GPU."""
    return request.param
