"""normfuse: fused normalization layers for PyTorch with learnable scale (gamma) and shift (beta)."""

from normfuse.functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from normfuse.modules import LayerNorm, RMSNorm
from normfuse.ops import use_backend

__version__ = "0.2.0"

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm",
    "rms_norm",
    "use_backend",
    "__version__",
]
