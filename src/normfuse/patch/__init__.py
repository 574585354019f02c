"""``normfuse.patch(model)``: swap, in place, every norm normfuse computes exactly.

How: each recognized module instance gets a generated subclass of its own class as its
``__class__`` (``NormfuseLlamaRMSNorm`` for a ``LlamaRMSNorm``), whose ``forward`` calls normfuse
with the class's own formula. Nothing else about the module changes: the same ``Parameter``
objects (optimizer state and tied weights survive), attribute names (``eps``,
``variance_epsilon``), ``state_dict`` keys, hooks, ``isinstance`` checks, device and dtype;
``unpatch`` restores the original class. Only the instances of the model passed in change, never
the classes, so other models in the process are untouched (patching classes before loading, as
some libraries do, changes every model built afterwards instead). A class that
``torch.nn.utils.parametrize`` made for the module stays on top (a copy of it), the generated
one going below it; the class's forward bound on the instance (accelerate's hooks keep it in ``_old_forward``)
is bound to the generated class's, and a module whose instance ``forward`` is something else
is left alone.

torch's own ``nn.LayerNorm`` and ``nn.RMSNorm`` (and their subclasses) get normfuse's module
inserted just below them in the method resolution order, so a subclass with its own forward
(a permute around ``super().forward``, say) keeps it and reaches normfuse through ``super()``; a
subclass whose forward never reaches torch's (it calls ``F.layer_norm`` itself) is swapped by the
formula its forward computes, as any other class, or left alone.

``fuse_residual=True`` also swaps the blocks around a norm whose residual add joins the norm's
kernel: pre- and post-norm blocks (Llama's decoder layer, GPT-2's, CLIP's, ViT's, Whisper's,
BART's, DistilBERT's, torch's ``nn.TransformerEncoderLayer``, ...), whose forward is compiled
again with the add-then-norm statements fused (``rewrite``), and BERT's post-norm output blocks,
recognized by their statements (``formulas.POSTNORM_OUTPUT_BODY``).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from normfuse import functional, modules
from normfuse.patch import rewrite
from normfuse.patch.formulas import (
    HF_FORMULAS, Formula, body_statements, is_postnorm_output, probe_agrees, recognize,
)  # fmt: skip

__all__ = ["PatchReport", "patch", "unpatch"]


@dataclass
class PatchedNorm:
    path: str
    original_class: str
    formula: str
    # a block whose residual adds were fused (formula "fused ..."): how many adds
    fused_adds: int = 0


@dataclass
class SkippedNorm:
    path: str
    class_name: str
    reason: str


@dataclass
class PatchReport:
    """What ``patch`` did: the modules it swapped and the norm-like ones it left alone, with why."""

    patched: list[PatchedNorm] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)

    def __str__(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for entry in self.patched:
            key = (entry.original_class, entry.formula)
            counts[key] = counts.get(key, 0) + 1
        blocks = sum(entry.fused_adds > 0 for entry in self.patched)
        adds = sum(entry.fused_adds for entry in self.patched)
        lines = [f"normfuse.patch: {len(self.patched) - blocks} norm(s) patched, {len(self.skipped)} left alone"]
        if adds:
            lines[0] += f", {adds} residual add(s) fused"
        for (cls, formula), count in counts.items():
            lines.append(f"  patched  {count:3d} x {cls} ({formula})")
        for entry in self.skipped:
            lines.append(f"  left     {entry.path}: {entry.class_name}: {entry.reason}")
        return "\n".join(lines)


def _torch_layer_norm_add(module, x, residual, eps, dropout=None):
    if x.dtype != residual.dtype or x.shape != residual.shape:
        h = _dropped(x, dropout) + residual  # torch's promotion and broadcast, as the unfused code
        return functional.layer_norm(h, module.normalized_shape, module.weight, module.bias, eps), h
    return functional.add_layer_norm(
        x, residual, module.normalized_shape, module.weight, module.bias, eps, **_dropout_kwargs(dropout)
    )


def _torch_rms_norm_add(module, x, residual, eps, dropout=None):
    if x.dtype != residual.dtype or x.shape != residual.shape:
        h = _dropped(x, dropout) + residual
        return functional.rms_norm(h, module.normalized_shape, module.weight, eps), h
    return functional.add_rms_norm(x, residual, module.normalized_shape, module.weight, eps, **_dropout_kwargs(dropout))


# torch's norms' fused adds also take the nn.Dropout that acts on x before the add (BERT's output
# blocks under fuse_dropout=True): the kernel then draws its mask
def _dropped(x, dropout):
    return x if dropout is None else dropout(x)


def _dropout_kwargs(dropout) -> dict:
    return {} if dropout is None else {"dropout_p": dropout.p, "training": dropout.training}


# (the fused adds hold for torch's classes themselves, not for subclasses with a forward of their
# own: ``_fusable_formula``)
_TORCH_FORMULAS = {
    torch.nn.LayerNorm: Formula(
        "torch LayerNorm", "torch.nn.LayerNorm and subclasses", "eps", None, add_forward=_torch_layer_norm_add,
        kind="layer",
    ),
    torch.nn.RMSNorm: Formula(
        "torch RMSNorm", "torch.nn.RMSNorm and subclasses", "eps", None, add_forward=_torch_rms_norm_add
    ),
}
_generated: dict[tuple[type, str], type | None] = {}
# the keys of the fused classes of a decoder layer and of a post-norm output block (formula names
# are the others')
_FUSED = "fused"
_FUSED_OUTPUT = "fused output"
_FUSED_OUTPUT_DROPOUT = "fused output with dropout"


def _reduce_ex(self: torch.nn.Module, protocol: int) -> tuple:
    """Pickling (``torch.save`` of a whole model, ``copy.deepcopy``) of a patched module.

    A generated class lives in no module's namespace, so pickle's lookup by name would fail;
    the default reduction is kept, with the class replaced by how to make it again: the
    original class (pickled by name, as before patching) and the formula's name.
    """
    _, _, *rest = object.__reduce_ex__(self, protocol)
    cls = type(self)
    return (_rebuild, (cls._normfuse_original_class, cls._normfuse_key), *rest)


def _rebuild(original: type, key: str) -> torch.nn.Module:
    """An empty instance of the patched class of ``original`` (made again if this process has
    not made it yet); unpickling then restores the module's state into it."""
    if key == _FUSED or key.startswith(_FUSED + ":"):
        # "fused": a Llama-family decoder layer as normfuse 0.2 pickled it
        with_dropout = key.endswith(_WITH_DROPOUT)
        names = key.removesuffix(_WITH_DROPOUT).partition(":")[2].split(",") if ":" in key else ["post_attention_layernorm"]
        cls = _rewritten_class(original, frozenset(names), with_dropout)
    elif key in (_FUSED_OUTPUT, _FUSED_OUTPUT_DROPOUT):
        cls = _fused_output_class(original, key == _FUSED_OUTPUT_DROPOUT)
    else:
        # a Hugging Face formula as ``patch`` recognized it in the class (where it reads eps from)
        formula = _TORCH_FORMULAS_BY_NAME.get(key) or recognize(original)
        cls = _patched_class(original, formula)
    return cls.__new__(cls)


def _generated_namespace(cls: type, key: str) -> dict:
    return {
        "_normfuse_original_class": cls, "_normfuse_key": key, "__reduce_ex__": _reduce_ex,
        "__prepare_scriptable__": modules.not_scriptable, "__module__": __name__,
    }  # fmt: skip


def _patched_class(cls: type, formula: Formula) -> type:
    key = (cls, formula.name)
    made = _generated.get(key)
    if made is not None:
        return made
    namespace = {**_generated_namespace(cls, formula.name), "_normfuse_formula": formula}
    if formula.forward is not None:
        namespace["forward"] = lambda self, x: formula.forward(self, x, formula.eps(self))
        made = type(f"Normfuse{cls.__name__}", (cls,), namespace)
    else:
        mixin = modules.LayerNorm if issubclass(cls, torch.nn.LayerNorm) else modules.RMSNorm
        bases = (mixin,) if cls in (torch.nn.LayerNorm, torch.nn.RMSNorm) else (cls, mixin)
        made = type(f"Normfuse{cls.__name__}", bases, namespace)
    _generated[key] = made
    return made


def _torch_formula(module: torch.nn.Module) -> Formula | None:
    for base, formula in _TORCH_FORMULAS.items():
        if isinstance(module, base):
            return formula
    return None


def _reaches_torch_forward(cls: type) -> str | None:
    """None where every ``forward`` that a subclass of torch's LayerNorm or RMSNorm defines goes on
    through ``super().forward`` (which, once normfuse's module is below the subclass in the method
    resolution order, is normfuse's); else why normfuse would not run. A forward that calls
    ``F.layer_norm`` itself, or ``nn.LayerNorm.forward(self, x)`` by name, never reaches it: the
    swap would change nothing, and the report would say otherwise."""
    for klass in cls.__mro__:
        if klass in _TORCH_FORMULAS:
            return None
        if "forward" not in vars(klass):
            continue
        body = body_statements(klass.forward)
        if body is None:
            return f"{klass.__qualname__}.forward: no source to check that it calls super().forward"
        calls = ("super().forward(", f"super({klass.__name__},self).forward(")
        if not any(call in statement for statement in body for call in calls):
            return (
                f"{klass.__qualname__}.forward does not go on through super().forward "
                "(normfuse, swapped in below it, would never run)"
            )
    return None


# Instance attributes that may hold the class's forward bound to the module: accelerate's hooks
# (``device_map`` loading, offloading) keep it in ``_old_forward`` and call it from the
# ``forward`` they set on the instance; removing a hook leaves it in ``forward``.
_FORWARD_ATTRIBUTES = ("forward", "_old_forward")
_FORWARD_REPLACED = "its forward is replaced on the instance (module.forward = ...): normfuse would never run"


def _bound_forwards(module: torch.nn.Module) -> list[str] | None:
    """The instance attributes holding the module's class forward bound to it, to be bound again
    once the class is swapped; None where an instance ``forward`` calls something else, which
    would shadow the swapped class's forward."""
    function = type(module).forward
    bound = [
        name for name in _FORWARD_ATTRIBUTES
        if isinstance(value := module.__dict__.get(name), types.MethodType)
        and value.__self__ is module and value.__func__ is function
    ]  # fmt: skip
    if "forward" in module.__dict__ and not bound:
        return None
    return bound


def _swap_class(module: torch.nn.Module, cls: type, bound: list[str]) -> None:
    if torch.nn.utils.parametrize.is_parametrized(module):
        # parametrize gave the module a class over the one it had, holding the parametrized
        # tensors' properties, and remove_parametrizations puts back that class's first base: the
        # swap goes below it, in a copy of it (a deepcopy of the module shares parametrize's
        # class, and must not change with it), so that removing a parametrization keeps the
        # module patched (or unpatched)
        namespace = {k: v for k, v in vars(type(module)).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(f"Parametrized{cls.__name__}", (cls,), namespace)
    else:
        module.__class__ = cls
    for name in bound:
        module.__dict__[name] = types.MethodType(type(module).forward, module)


def _class_below_parametrize(module: torch.nn.Module) -> type:
    """The module's class, or under parametrize the class it had (the one patch swaps)."""
    cls = type(module)
    return cls.__bases__[0] if torch.nn.utils.parametrize.is_parametrized(module) else cls


def _looks_like_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))


def patch(
    model: torch.nn.Module,
    *,
    layer_norm: bool = True,
    rms_norm: bool = True,
    fuse_residual: bool = False,
    fuse_dropout: bool = False,
) -> PatchReport:
    """Swap, in place, every norm of ``model`` that normfuse computes exactly; return a report.

    ``layer_norm`` / ``rms_norm`` choose the kinds to swap (torch's LayerNorm and its
    subclasses; RMSNorm: torch's and the Hugging Face classes whose formula is recognized).
    ``fuse_residual`` (opt-in) also fuses the residual add with the norm that follows it
    (``add_rms_norm`` / ``add_layer_norm``), in pre- and post-norm blocks (Llama's decoder
    layers, GPT-2's, CLIP's, ViT's, Whisper's, BART's, DistilBERT's, torch's transformer layers,
    ...: their forward compiled again with the add fused, ``rewrite``) and in BERT's post-norm
    output blocks (dense, dropout, norm of the residual sum): the same outputs as the patched
    model without it, bit for bit, one pass over memory fewer.
    ``fuse_dropout`` (opt-in, with ``fuse_residual``) also fuses those output blocks' dropout
    (an ``nn.Dropout``) into the add and the norm: normfuse's masks, reproduced by
    ``torch.manual_seed`` with the same keep rate and scale, but not ``nn.Dropout``'s draws, so
    training runs differ from the unpatched model's as two seeds do (eval mode: no change).
    Calling it twice is harmless (a second call with ``fuse_dropout`` takes the dropout into the
    blocks a first call fused without it); ``unpatch(model)`` restores the original modules.
    """
    if fuse_dropout and not fuse_residual:
        raise ValueError("fuse_dropout=True fuses the dropout of the residual adds that fuse_residual=True fuses: pass both")
    report = PatchReport()
    for path, module in model.named_modules():
        cls = _class_below_parametrize(module)
        if getattr(cls, "_normfuse_original_class", None) is not None or isinstance(
            module, (modules.LayerNorm, modules.RMSNorm)
        ):
            continue  # already patched, or normfuse's own module
        formula = _torch_formula(module)
        if formula is None and not _looks_like_norm(module):
            continue
        reason = None if formula is None else _reaches_torch_forward(cls)
        if formula is None or reason is not None:
            # by what its forward computes: a class of its own, or a subclass of torch's norm
            # whose forward never reaches torch's (SqueezeBERT's, VideoPrism's LayerNorms)
            recognized = recognize(cls)
            if recognized is not None:
                formula, reason = recognized, None
            elif formula is None:
                reason = "forward not recognized as a formula normfuse reproduces exactly"
                if next(module.children(), None) is not None:
                    # SqueezeBERT's ConvDropoutLayerNorm, wav2vec2's ...EncoderLayerStableLayerNorm
                    reason += " (it holds submodules, each patched or left on its own)"
        if formula is not None and not (layer_norm if formula.kind == "layer" else rms_norm):
            reason = "not asked for"
        elif reason is None and formula.forward is not None:
            reason = probe_agrees(module, formula)
        bound = _bound_forwards(module)
        if reason is None and bound is None:
            reason = _FORWARD_REPLACED
        if reason is not None:
            report.skipped.append(SkippedNorm(path, cls.__qualname__, reason))
            continue
        _swap(module, _patched_class(cls, formula), bound)
        report.patched.append(PatchedNorm(path, f"{cls.__module__}.{cls.__qualname__}", formula.name))
    if fuse_residual:
        _fuse_residuals(model, report, fuse_dropout)
    return report


def _add_norm(self, name: str, a, b, dropout: tuple | None = None):
    """``(N(a + b), a + b)`` for the norm ``N = self.<name>``: what the statements a rewritten
    forward replaced compute (``rewrite``), fused where N's patched formula offers the add and the
    operands allow it (tensors of one dtype, shape and device), unfused otherwise. ``dropout``
    (``fuse_dropout``): ``(which, p, training, module)``, operand ``which`` dropped first, by
    ``F.dropout(p, training)`` or by ``module`` (the kernel's masks where it is an ``nn.Dropout``
    or a functional dropout and N is torch's norm)."""
    norm = getattr(self, name)
    formula = _fusable_formula(norm)
    fused = formula is not None and not (
        _hooked(norm) or "forward" in norm.__dict__
        or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
        or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device
    )  # fmt: skip
    drop = None
    if dropout is not None:
        which, p, training, module = dropout
        drop = _FunctionalDropout(p, training) if module is None else module
        # the kernels take the dropout with torch's own norms, as an nn.Dropout's (or F.dropout's)
        # p and mode; any other dropout, or norm, has the dropout run by torch before the add
        if not (fused and _takes_dropout(formula) and (module is None or type(module) is torch.nn.Dropout)):
            a, b = (drop(a), b) if which == 0 else (a, drop(b))
            drop = None
    if not fused:
        h = a + b  # hooks to run, a forward replaced on the instance, or what the kernels do not add
        return norm(h), h
    if drop is None:
        return formula.add_forward(norm, a, b, formula.eps(norm))
    x, residual = (a, b) if which == 0 else (b, a)
    return formula.add_forward(norm, x, residual, formula.eps(norm), drop)


def _takes_dropout(formula: Formula) -> bool:
    return any(formula is torch_formula for torch_formula in _TORCH_FORMULAS.values())


class _FunctionalDropout(NamedTuple):
    """``F.dropout(x, p, training)`` as the fused adds of torch's norms take a dropout module."""

    p: float
    training: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, self.p, self.training)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling the module would run hooks (its own or every module's) that the fused
    call would skip."""
    registry = torch.nn.modules.module
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        or registry._global_forward_hooks or registry._global_forward_pre_hooks or registry._global_backward_hooks
        or registry._global_backward_pre_hooks
    )  # fmt: skip


def _fused_output_forward(self, hidden_states, input_tensor):
    """BERT's output block with the residual add and the norm fused (the dropout stays torch's:
    the same draws as unfused)."""
    hidden_states = self.dropout(self.dense(hidden_states))
    norm = self.LayerNorm
    formula = type(norm)._normfuse_formula
    return formula.add_forward(norm, hidden_states, input_tensor, formula.eps(norm))[0]


def _fused_output_dropout_forward(self, hidden_states, input_tensor):
    """BERT's output block with its dropout, residual add and norm in one pass (normfuse's masks;
    the norm is torch's, whose fused add takes the dropout)."""
    hidden_states = self.dense(hidden_states)
    norm = self.LayerNorm
    formula = type(norm)._normfuse_formula
    return formula.add_forward(norm, hidden_states, input_tensor, formula.eps(norm), self.dropout)[0]


def _fusable_formula(norm: torch.nn.Module | None) -> Formula | None:
    """The formula of a patched norm, where it offers the residual add fused with it."""
    formula = getattr(type(norm), "_normfuse_formula", None)
    if formula is None or formula.add_forward is None:
        return None
    if formula.forward is None and type(norm)._normfuse_original_class not in _TORCH_FORMULAS:
        return None  # a subclass of torch's norm, with a forward of its own around it
    return formula


def _fuse_residuals(model: torch.nn.Module, report: PatchReport, fuse_dropout: bool) -> None:
    for path, module in model.named_modules():
        cls = _class_below_parametrize(module)
        upgrade = False
        if getattr(cls, "_normfuse_original_class", None) is not None:
            original = cls._normfuse_original_class
            if not fuse_dropout or not (
                cls._normfuse_key == _FUSED_OUTPUT
                or (
                    cls._normfuse_key.startswith(_FUSED + ":") and not cls._normfuse_key.endswith(_WITH_DROPOUT)
                    and _scan(original)[1]  # (whether into a fusable norm: below)
                )  # fmt: skip
            ):
                continue
            # a block fused by an earlier call without fuse_dropout: its dropout joins now
            cls, upgrade = original, True
        adds = 1
        if is_postnorm_output(cls):
            norms = {"LayerNorm": getattr(module, "LayerNorm", None)}
            # the dropout joins the kernel where it is torch's own and the norm is torch's (whose
            # functional form takes a dropout); otherwise it stays as it is
            torch_dropout = type(getattr(module, "dropout", None)) is torch.nn.Dropout
            with_dropout = fuse_dropout and torch_dropout and isinstance(norms["LayerNorm"], (modules.LayerNorm, modules.RMSNorm))
            make = functools.partial(_fused_output_class, cls, with_dropout)
            what = "dropout + residual add" if with_dropout else "residual add"
            if upgrade and not with_dropout:
                continue  # a dropout that is not torch's stays out, as in a single call
        else:
            names, dropped_into = _scan(cls)
            # the modules the adds go into that are norms (a triple may end in self.mlp(...))
            norms = {name: norm for name in dict.fromkeys(names) if _is_norm(norm := getattr(module, name, None))}
            fusable = frozenset(name for name, norm in norms.items() if _fusable_formula(norm) is not None)
            if not norms:
                continue
            adds = len(fusable)  # the norms an add joins (a branch may repeat one in the code)
            with_dropout = fuse_dropout and any(name in fusable for name in dropped_into)
            if upgrade and not with_dropout:
                continue  # no dropout before an add into a fusable norm: nothing to take in
            make = functools.partial(_rewritten_class, cls, fusable, with_dropout)
            what = "residual add" if adds == 1 else f"{adds} residual adds"
            what = f"dropout + {what}" if with_dropout else what
        formulas = [formula.name for norm in norms.values() if (formula := _fusable_formula(norm)) is not None]
        if not formulas:
            report.skipped.append(SkippedNorm(path, cls.__qualname__, "residual add not fused: its norm is not patched with a fusable formula"))
            continue
        bound = _bound_forwards(module)
        if bound is None:
            report.skipped.append(SkippedNorm(path, cls.__qualname__, f"residual add not fused: {_FORWARD_REPLACED}"))
            continue
        fused = make()
        if fused is None:
            report.skipped.append(SkippedNorm(path, cls.__qualname__, f"residual add not fused: {_NOT_REWRITTEN}"))
            continue
        _swap_class(module, fused, bound)
        formula_names = " / ".join(dict.fromkeys(formulas))
        report.patched.append(
            PatchedNorm(path, f"{cls.__module__}.{cls.__qualname__}", f"fused {what} + {formula_names}", fused_adds=adds)
        )


_NOT_REWRITTEN = (
    "its forward could not be compiled again with the add fused (no source, a source file changed "
    "since it was imported, a closure, or a decorator whose wrapper normfuse cannot rebuild)"
)


@functools.cache
def _scan(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The norms after residual adds in the class's forward, and those whose add has a dropout
    just before it."""
    return rewrite.scan(cls.forward) if isinstance(getattr(cls, "forward", None), types.FunctionType) else ((), ())


def _is_norm(module: object) -> bool:
    return isinstance(module, torch.nn.Module) and (
        _fusable_formula(module) is not None or _torch_formula(module) is not None or _looks_like_norm(module)
    )


def _fused_output_class(cls: type, with_dropout: bool = False) -> type:
    """The generated subclass of a post-norm output block whose forward fuses its residual add
    (and its dropout)."""
    name = _FUSED_OUTPUT_DROPOUT if with_dropout else _FUSED_OUTPUT
    key = (cls, name)
    fused = _generated.get(key)
    if fused is None:
        forward = _fused_output_dropout_forward if with_dropout else _fused_output_forward
        namespace = {**_generated_namespace(cls, name), "forward": forward}
        fused = _generated[key] = type(f"NormfuseFused{cls.__name__}", (cls,), namespace)
    return fused


def _rewritten_class(cls: type, names: frozenset[str], with_dropout: bool = False) -> type | None:
    """The generated subclass of a block whose forward has the residual adds before its norms
    ``names`` fused (``rewrite.fused_forward``; ``with_dropout``: and the dropouts just before
    them); None where its forward cannot be rewritten."""
    key = (cls, _fused_key(names, with_dropout))
    if key not in _generated:
        owner = next(klass for klass in cls.__mro__ if "forward" in vars(klass))
        forward = rewrite.fused_forward(cls.forward, names, owner, with_dropout)
        _generated[key] = None if forward is None else type(
            f"NormfuseFused{cls.__name__}", (cls,),
            {**_generated_namespace(cls, key[1]), "forward": forward, rewrite.FUSED_METHOD: _add_norm},
        )  # fmt: skip
    return _generated[key]


def _fused_key(names: frozenset[str], with_dropout: bool) -> str:
    return _FUSED + ":" + ",".join(sorted(names)) + (_WITH_DROPOUT if with_dropout else "")


_WITH_DROPOUT = "+dropout"


def _swap(module: torch.nn.Module, patched: type, bound: list[str]) -> None:
    if issubclass(patched, (modules.LayerNorm, modules.RMSNorm)):
        # the normfuse modules' pre-norm extras, unset (torch's contract unchanged)
        module.__dict__.setdefault("dropout_p", 0.0)
        module.__dict__.setdefault("residual_dtype", None)
    _swap_class(module, patched, bound)


def unpatch(model: torch.nn.Module) -> int:
    """Restore every module ``patch`` swapped in ``model``; returns how many."""
    restored = 0
    for module in model.modules():
        original = getattr(type(module), "_normfuse_original_class", None)
        if original is None:
            continue
        _swap_class(module, original, _bound_forwards(module) or [])
        if not issubclass(original, (modules.LayerNorm, modules.RMSNorm)):
            module.__dict__.pop("dropout_p", None)
            module.__dict__.pop("residual_dtype", None)
        restored += 1
    return restored


FORMULAS = tuple(_TORCH_FORMULAS.values()) + HF_FORMULAS
_TORCH_FORMULAS_BY_NAME = {formula.name: formula for formula in _TORCH_FORMULAS.values()}
