"""Does ``normfuse.patch.rewrite`` work under this Python? A probe without torch, for interpreters
that have no torch installed (CI tests the rewrite under its own Python only).

Not a benchmark. It loads ``src/normfuse/patch/rewrite.py`` by path (the module imports nothing
but the standard library), writes a block class to a temporary module (a decorator's wrapper,
``super()``, a default, a generator expression, an imported module's function called, a
cross-attention branch between an add and its norm), and checks that ``fused_forward`` compiles
it again, that the fused forward returns what the class's does on both branches with the
decorator still running, and that a source edited after the import is refused.

    python3.10 benchmarks/rewrite_probe.py      # (3.10 to 3.13 pass, twenty-sixth session)
"""

from __future__ import annotations

import importlib
import importlib.util
import linecache
import sys
import tempfile
from pathlib import Path

BLOCK = '''
import functools
import os


def counted(f):
    @functools.wraps(f)
    def wrapper(self, *a, **k):
        self.calls += 1
        return f(self, *a, **k)
    return wrapper


class Norm:
    def __call__(self, x):
        return x * 2


class Base:
    def mix(self, h):
        return h + 1


class Block(Base):
    def __init__(self):
        self.norm, self.norm2, self.calls = Norm(), Norm(), 0

    def _normfuse_add_norm(self, name, a, b, dropout=None):
        h = a + b
        return getattr(self, name)(h), h

    @counted
    def forward(self, hidden_states, scale=0.5, context=None):
        """A docstring
        on two lines."""
        residual = hidden_states
        hidden_states = super().mix(hidden_states) * scale
        total = sum(v for v in (1, 2, 3)) + len(os.path.join("a", "b"))
        hidden_states = residual + hidden_states
        if context is not None:
            residual = hidden_states
            hidden_states = self.norm2(hidden_states)
            hidden_states = residual + hidden_states * context
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        return hidden_states + residual + total
'''


def main() -> int:
    source = Path(__file__).resolve().parents[1] / "src" / "normfuse" / "patch" / "rewrite.py"
    spec = importlib.util.spec_from_file_location("normfuse_rewrite_probe", source)
    rewrite = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rewrite  # (dataclasses look their module up)
    spec.loader.exec_module(rewrite)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "normfuse_probe_block.py"
        path.write_text(BLOCK)
        sys.path.insert(0, directory)
        block_module = importlib.import_module("normfuse_probe_block")
        cls = block_module.Block
        names = rewrite.add_norm_names(cls.forward)
        fused = rewrite.fused_forward(cls.forward, frozenset(names), cls)
        block = cls()
        checks = {
            "the adds found": names == ("norm2", "norm", "norm"),
            "compiled again": fused is not None,
            "same result, no branch": fused is not None and fused(block, 3.0) == cls.forward(block, 3.0),
            "same result, the branch": fused is not None and fused(block, 3.0, context=2.0) == cls.forward(block, 3.0, context=2.0),
            "decorator ran": block.calls == 4,
        }
        path.write_text(BLOCK.replace("(1, 2, 3)", "(1, 2, 4)"))  # edited after the import
        linecache.checkcache(str(path))
        checks["an edited source refused"] = rewrite.fused_forward(cls.forward, frozenset(names), cls) is None
    print(f"Python {sys.version.split()[0]}: " + ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
