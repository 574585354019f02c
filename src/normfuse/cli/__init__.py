"""The ``normfuse`` command: ``demo``, ``bench`` and ``verify``.

Built on argparse (standard library) for arguments, rich for tables and progress bars, and
matplotlib (Agg, no display needed) for PNG plots: well-kept libraries rather than terminal
drawing of our own. Every subcommand has ``--help``; a bad argument prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def say_if_overwriting(path: Path, console) -> None:
    """Output files are replaced, never silently: name each one that already exists."""
    if path.exists():
        console.print(f"[yellow]overwriting {path}[/yellow]")


def build_parser() -> argparse.ArgumentParser:
    from normfuse.cli import bench, demo, verify

    parser = _Parser(prog="normfuse", description="normfuse: fused LayerNorm, RMSNorm and add+norm for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (demo, bench, verify):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command == "bench":
        # the real command line (not a call from Python): time with a quiet allocator
        from normfuse.cli.bench import reexec_with_malloc_tunables

        # a model's step is not timed through interleaved_medians: no warm-up run for it
        reexec_with_malloc_tunables(warm_first=getattr(args, "model", None) is None)
    return int(args.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
