"""normfuse: fused normalization layers for PyTorch with learnable scale (gamma) and shift (beta)."""

from normfuse.functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from normfuse.modules import LayerNorm, RMSNorm
from normfuse.ops import use_backend
from normfuse.patch import PatchReport, patch, unpatch

__version__ = "0.2.0"

__all__ = [
    "LayerNorm",
    "PatchReport",
    "RMSNorm",
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm",
    "patch",
    "rms_norm",
    "unpatch",
    "use_backend",
    "__version__",
]
