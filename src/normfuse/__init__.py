"""normfuse: fused normalization layers for PyTorch with learnable scale (gamma) and shift (beta)."""

from normfuse.functional import layer_norm
from normfuse.modules import LayerNorm
from normfuse.ops import use_backend

__version__ = "0.1.0"

__all__ = ["LayerNorm", "layer_norm", "use_backend", "__version__"]
