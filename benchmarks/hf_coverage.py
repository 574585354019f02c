"""How many of the installed transformers' norm classes ``normfuse.patch`` would swap.

Not a benchmark: the count behind docs/model-families.md. It imports every
``transformers.models.*.modeling_*`` module, takes the classes defined there whose name ends in
``Norm`` (batch and group norms aside), and sorts them as ``patch`` would:
torch's LayerNorm/RMSNorm subclasses that reach torch's forward, classes whose formula is
recognized (by name of formula; torch's subclasses whose forward does not reach torch's too),
and the rest. It also counts the blocks whose residual adds ``fuse_residual=True`` fuses where
their norm is patched with a fusable formula: the blocks with a residual add then a norm in their
forward (``rewrite.add_norm_names``; here a module named ``*norm*`` or ``ln_*``, where ``patch``
looks at the module itself) and BERT's post-norm output blocks. The numerical
probe that ``patch`` runs on an instance is not run here (that needs each class's constructor
arguments); the tests run it on the families' classes.

    python benchmarks/hf_coverage.py [--list]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import warnings
from collections import Counter

import torch
import transformers
import transformers.models

from normfuse.patch import _reaches_torch_forward
from normfuse.patch.formulas import is_postnorm_output, recognize
from normfuse.patch.rewrite import scan


def _modeling_modules():
    for info in pkgutil.iter_modules(transformers.models.__path__):
        name = f"transformers.models.{info.name}.modeling_{info.name}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield importlib.import_module(name)
        except Exception:  # noqa: BLE001 (a model whose optional dependency is missing)
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="name every class left alone")
    args = parser.parse_args()
    formulas: Counter[str] = Counter()
    left: list[str] = []
    torch_subclasses = torch_reached = fusable = with_dropout = fusable_outputs = norm_classes = 0
    for module in _modeling_modules():
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != module.__name__:
                continue
            if not issubclass(cls, torch.nn.Module):
                continue
            if is_postnorm_output(cls):
                fusable_outputs += 1
            elif "forward" in vars(cls):
                names, dropped_into = scan(cls.forward)
                norm_like = [name for name in names if "norm" in name.lower() or name.startswith("ln_")]
                if norm_like:
                    fusable += 1
                    with_dropout += any(name in norm_like for name in dropped_into)
            if not cls.__name__.endswith("Norm") or issubclass(
                cls, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)
            ):
                continue
            norm_classes += 1
            if issubclass(cls, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                torch_subclasses += 1
                why = _reaches_torch_forward(cls)
                if why is None:
                    torch_reached += 1
                    continue
            else:
                why = None
            # its own formula: a class of its own, or a torch subclass whose forward never reaches torch's
            formula = recognize(cls)
            if formula is None:
                left.append(f"{module.__name__}.{cls.__name__}" + (f": {why}" if why else ""))
            else:
                formulas[formula.name] += 1
    recognized = sum(formulas.values())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{norm_classes} norm classes: {recognized} with a recognized formula, "
          f"{torch_reached} of {torch_subclasses} torch LayerNorm/RMSNorm subclasses reach torch's forward, "
          f"{len(left)} left alone")  # fmt: skip
    print("formulas: " + ", ".join(f"{name} {count}" for name, count in formulas.most_common()))
    print(f"{fusable} block classes with a residual add then a norm (pre- or post-norm) that fuse_residual=True fuses, "
          f"{with_dropout} of them with a dropout just before an add (fuse_dropout=True)")  # fmt: skip
    print(f"{fusable_outputs} output block classes with the post-norm body (BERT's) that fuse_residual=True fuses")
    if args.list:
        print("\n".join(f"  left  {entry}" for entry in sorted(left)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
