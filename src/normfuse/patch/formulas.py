"""What each supported norm class computes, and the normfuse call that computes the same.

A class is recognized by what its ``forward`` computes, not by its name: its source, with
comments, docstrings, blank space and the signature removed, must be one of the statement
sequences below (the Llama formula is shared verbatim by Mistral, Mixtral, Qwen2/3, Phi-3,
Granite and many others), and so must the ``_norm`` helper's where the forward calls one (the
same forward over a ``_norm`` that sums instead of averaging is an L2 norm, not an RMS one).
A numerical probe at patch time must then agree with normfuse in float32 and bfloat16.
Anything else is left alone and reported. The formulas, in words, are in docs/model-families.md.
"""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from normfuse import functional


@dataclass(frozen=True)
class Body:
    """One way of writing a formula that ``recognize`` accepts: the statements of a class's
    ``forward`` and, where that forward calls ``self._norm``, the statements ``_norm`` must have
    (whitespace removed, as ``body_statements`` gives them)."""

    forward: tuple[str, ...]
    norm: tuple[str, ...] | None = None
    # the attribute these statements read eps from, where not the formula's (transformers 4's
    # Llama 4 and Gemma 3n norms read ``self.eps`` where 5's read ``self.variance_epsilon``)
    eps_attr: str | None = None
    # module attributes that must be None for these statements to compute the formula (a
    # ``group_size`` normalizes groups of features in the branch the formula does not take)
    unset: tuple[str, ...] = ()


@dataclass(frozen=True)
class Formula:
    name: str
    families: str
    # the module attribute holding eps (``recognize`` gives it as the class's statements read it);
    # None: eps is a number written in the statements, ``eps_value``
    eps_attr: str | None
    # the forward of a patched module: (module, input, eps) -> output
    forward: Callable[[torch.nn.Module, Tensor, float], Tensor]
    # the forwards recognized as this formula (empty: recognized by class, torch's own norms)
    bodies: tuple[Body, ...] = ()
    # (module, x, residual, eps) -> (norm(residual + x), residual + x), fused; None: not offered
    # (torch's norms' take the nn.Dropout acting on x as a fifth argument: ``patch``'s fuse_dropout)
    add_forward: Callable[[torch.nn.Module, Tensor, Tensor, float], tuple[Tensor, Tensor]] | None = None
    # which of patch()'s switches covers it: "layer" (layer_norm=) or "rms" (rms_norm=)
    kind: str = "rms"
    # False: the formula scales by no weight (a module may still hold one it never uses)
    weighted: bool = True
    eps_value: float | None = None
    # as ``Body.unset``, from the body ``recognize`` found
    unset: tuple[str, ...] = ()
    # the dim of the input that holds the features (1: channels first, as SqueezeBERT's)
    feature_dim: int = -1

    def eps(self, module: torch.nn.Module) -> float:
        return self.eps_value if self.eps_attr is None else getattr(module, self.eps_attr)


def _n(module: torch.nn.Module) -> tuple[int, ...]:
    return (module.weight.shape[-1],)


def _scale(module: torch.nn.Module) -> Tensor | None:
    """The module's weight; None for a norm built without one (Gemma 3n/4's ``with_scale=False``)."""
    return module.weight if getattr(module, "with_scale", True) else None


def _llama(module, x, eps):
    return functional.rms_norm(x, _n(module), module.weight, eps, xhat_dtype=x.dtype)


def _llama_add(module, x, residual, eps):
    # the unfused layer normalizes ``residual + x``, whose dtype is the residual stream's
    return functional.add_rms_norm(x, residual, _n(module), module.weight, eps, xhat_dtype=residual.dtype)


def _gemma_add(module, x, residual, eps):
    return functional.add_rms_norm(x, residual, _n(module), module.weight, eps, weight_offset=1.0)


def _olmo2(module, x, eps):
    return functional.rms_norm(x, _n(module), module.weight, eps)


def _gemma4(module, x, eps):
    weight = _scale(module)
    shape = _n(module) if weight is not None else (x.shape[-1],)
    return functional.rms_norm(x, shape, weight, eps)


def _f32_rms_add(module, x, residual, eps):
    # OLMo-2's, Gemma 4's and Moshi's formula is torch's rms_norm (float32 statistics and product,
    # one rounding): its fused add is add_rms_norm's, the sum in the residual stream's dtype
    weight = _scale(module)
    shape = _n(module) if weight is not None else (x.shape[-1],)
    return functional.add_rms_norm(x, residual, shape, weight, eps)


def _moshi(module, x, eps):
    return functional.rms_norm(x, _n(module), module.weight, eps)


def _weightless(module, x, eps):
    return functional.rms_norm(x, (x.shape[-1],), None, eps)


def _rstd_rounded(module, x, eps):
    # the class's statistics are float32 ones for a float64 input too: its rstd then carries
    # float32's digits
    rstd_dtype = torch.float32 if x.dtype == torch.float64 else x.dtype
    return functional.rms_norm(x, (x.shape[-1],), None, eps, rstd_dtype=rstd_dtype)


def _gemma(module, x, eps):
    return functional.rms_norm(x, _n(module), module.weight, eps, weight_offset=1.0)


def _t5(module, x, eps):
    w = module.weight
    xhat_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return functional.rms_norm(x, _n(module), w, eps, xhat_dtype=xhat_dtype)


def _cohere(module, x, eps):
    # LayerNorm without bias, computed in float32 whatever the input (float64 too), weight in float32
    computed = x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()
    out = functional.layer_norm(computed, _n(module), module.weight.float(), None, eps)
    return out.to(x.dtype)


def _deberta(module, x, eps):
    # x-hat in float32 (float64 too), rounded to x's dtype, then the affine in torch's promotion
    w, b = module.weight, module.bias
    if x.dtype == w.dtype == b.dtype == torch.float32:
        # one kernel; the class's division and separate multiply and add differ by an ulp at most
        return functional.layer_norm(x, _n(module), w, b, eps)
    computed = x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()
    return w * functional.layer_norm(computed, _n(module), None, None, eps).to(x.dtype) + b


def _deberta_add(module, x, residual, eps):
    # the unfused block normalizes ``x + residual`` (in torch's promotion)
    w, b = module.weight, module.bias
    if x.dtype == residual.dtype == w.dtype == b.dtype == torch.float32 and x.shape == residual.shape:
        return functional.add_layer_norm(x, residual, _n(module), w, b, eps)
    h = x + residual
    return _deberta(module, h, eps), h


def _olmo(module, x, eps):
    # LayerNorm without weight or bias, computed in float32 whatever the input (float64 too)
    computed = x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()
    return functional.layer_norm(computed, module.normalized_shape, None, None, eps).to(x.dtype)


def _olmo_add(module, x, residual, eps):
    # the unfused layer normalizes ``residual + x`` (in the residual stream's dtype) and casts the
    # norm to that dtype; float64 is normalized in float32 there, which the fused kernel is not
    if residual.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dtype != residual.dtype:
        h = residual + x
        return _olmo(module, h, eps), h
    return functional.add_layer_norm(x, residual, module.normalized_shape, None, None, eps)


def _muse_spark(module, x, eps):
    # 1 + w in w's dtype (Gemma adds it in float32): the same when w is float32
    return functional.rms_norm(x, _n(module), 1.0 + module.weight, eps)


def _squeezebert(module, x, eps):
    # torch's LayerNorm over the channels of (batch, channels, length), through a permuted view
    y = functional.layer_norm(x.permute(0, 2, 1), module.normalized_shape, module.weight, module.bias, eps)
    return y.permute(0, 2, 1)


def _videoprism(module, x, eps):
    return functional.layer_norm(x, module.normalized_shape, module.weight + 1.0, module.bias, eps)


def _esmfold2(module, x, eps):
    # torch's LayerNorm of x in float32, cast back: a 16-bit x with float32 parameters is that
    # already (statistics and affine in float32, rounded once); with 16-bit parameters the
    # class's float32 input and 16-bit weight raise torch's error, and so does this
    w, b = module.weight, module.bias
    params_fp32 = all(p is None or p.dtype == torch.float32 for p in (w, b))
    computed = x if x.dtype in (torch.bfloat16, torch.float16) and params_fp32 else x.float()
    return functional.layer_norm(computed, module.normalized_shape, w, b, eps).to(x.dtype)


# the ``_norm`` helpers that the forwards below call: the plain RMS, r = rsqrt(mean(x²) + eps)
_RMS = "returnx*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+self.{eps})"
_RMS_EPS = (_RMS.format(eps="eps"),)
_RMS_VARIANCE_EPSILON = (_RMS.format(eps="variance_epsilon"),)
# Gemma 3n/4's: the same r written as a power (the ulp it may differ by is within the probe's bound)
_RMS_POW = (
    "mean_squared=hidden_states.pow(2).mean(-1,keepdim=True)+self.variance_epsilon",
    "returnhidden_states*torch.pow(mean_squared,-0.5)",
)
# the float32 upcast and r of the Llama-style forwards, the first four statements of theirs
_F32_RMS = (
    "input_dtype=hidden_states.dtype",
    "hidden_states=hidden_states.to(torch.float32)",
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)",
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)",
)

_GEMMA_FORWARD = ("output=self._norm(x.float())", "output=output*(1.0+self.weight.float())", "returnoutput.type_as(x)")

HF_FORMULAS = (
    Formula(
        "llama", "Llama 2/3/4, Mistral, Mixtral, Qwen2/3, Phi-3, Granite, ...: w * (f32(x) * r).to(x.dtype)",
        "variance_epsilon", _llama,
        (
            Body((*_F32_RMS, "returnself.weight*hidden_states.to(input_dtype)")),
            Body(("output=self._norm(x.float()).type_as(x)", "returnoutput*self.weight"), _RMS_VARIANCE_EPSILON),
            # transformers 4's Llama 4 (its eps attribute is ``eps``)
            Body(("output=self._norm(x.float()).type_as(x)", "returnoutput*self.weight"), _RMS_EPS, "eps"),
        ),
        _llama_add,
    ),
    Formula(
        "olmo2", "OLMo-2/3, GPT-OSS, Helium, Nemotron-H: (w * (f32(x) * r)).to(x.dtype)", "variance_epsilon", _olmo2,
        (
            Body((*_F32_RMS, "return(self.weight*hidden_states).to(input_dtype)")),
            Body((*_F32_RMS, "return(self.weight.to(torch.float32)*hidden_states).to(input_dtype)")),
        ),
        _f32_rms_add,
    ),
    Formula(
        "gemma4", "Gemma 3n and 4: (f32(x) * r * f32(w)).to(x.dtype), no weight where with_scale=False",
        "variance_epsilon", _gemma4,
        (
            Body(
                (
                    "normed_output=self._norm(hidden_states.float())",
                    "ifself.with_scale:",
                    "normed_output=normed_output*self.weight.float()",
                    "returnnormed_output.type_as(hidden_states)",
                ),
                _RMS_POW,
            ),
            # transformers 4's Gemma 3n: the root divided by (within the probe's bound, as above);
            # with_scale=False holds a weight of 1.0 there
            Body(
                ("output=self._norm(x.float())*self.weight.float()", "returnoutput.type_as(x)"),
                ("returnx/torch.sqrt(x.pow(2).mean(-1,keepdim=True)+self.eps)",),
                "eps",
            ),
        ),
        _f32_rms_add,
    ),
    Formula(
        "moshi", "Moshi, Kyutai STT, Ergo: (f32(x) * r * f32(w)).to(x.dtype)", "eps", _moshi,
        (
            Body(
                ("output=self._norm(x.float())", "output=output*self.weight.float()", "returnoutput.type_as(x)"), _RMS_EPS
            ),
            Body((
                "output=F.rms_norm(hidden_states.float(),self.weight.shape,self.weight.float(),self.eps)",
                "returnoutput.to(hidden_states.dtype)",
            )),  # fmt: skip
        ),
        _f32_rms_add,
    ),
    Formula(
        "weightless", "Llama 4's QK norm, FalconMamba's, Inkling 2's: (f32(x) * r).to(x.dtype), no weight",
        "variance_epsilon", _weightless,
        (
            Body(("returnself._norm(x.float()).type_as(x)",), _RMS_VARIANCE_EPSILON),
            Body(("returnself._norm(x.float()).type_as(x)",), _RMS_EPS, "eps"),  # transformers 4's Llama 4
            Body((
                "input_dtype=hidden_states.dtype",
                "hidden_states=hidden_states.float()",
                "hidden_states=hidden_states*torch.rsqrt(hidden_states.square().mean(-1,keepdim=True)"
                "+self.variance_epsilon)",
                "returnhidden_states.to(input_dtype)",
            )),  # fmt: skip
        ),
        weighted=False,
    ),
    Formula(
        "rstd_rounded", "DeepSeek-V4's and GLM-5 Next's unweighted norms: x * r.to(x.dtype), no weight",
        "variance_epsilon", _rstd_rounded,
        (Body(("returnx*torch.rsqrt(x.float().square().mean(-1,keepdim=True)+self.variance_epsilon).to(x.dtype)",)),),
        weighted=False,
    ),
    Formula(
        "gemma", "Gemma 1-3: (f32(x) * r * (1 + f32(w))).to(x.dtype)", "eps", _gemma,
        (
            Body(_GEMMA_FORWARD, _RMS_EPS),
            # Qwen4-Exp's: where its group_size is set, _norm normalizes groups of features instead
            Body(
                _GEMMA_FORWARD,
                (
                    "ifself.group_sizeisnotNone:",
                    "x=x.reshape(*x.shape[:-1],-1,self.group_size)",
                    "out=x*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+self.eps)",
                    "returnout.flatten(-2)ifself.group_sizeisnotNoneelseout",
                ),
                unset=("group_size",),
            ),
        ),
        _gemma_add,
    ),
    Formula(
        "muse_spark", "Muse Spark's centered norm: (f32(x) * r * f32(1 + w)).to(x.dtype), 1 + w in w's dtype",
        "eps", _muse_spark,
        (
            Body(
                ("output=self._norm(x.float())", "output=output*(1.0+self.weight).float()", "returnoutput.type_as(x)"),
                _RMS_EPS,
            ),
        ),
    ),
    Formula(
        "t5", "T5, Pix2Struct: w * (x * r).to(w.dtype if w is fp16/bf16)", "variance_epsilon", _t5,
        (
            Body((
                "variance=hidden_states.to(torch.float32).pow(2).mean(-1,keepdim=True)",
                "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)",
                "ifself.weight.dtypein[torch.float16,torch.bfloat16]:",
                "hidden_states=hidden_states.to(self.weight.dtype)",
                "returnself.weight*hidden_states",
            )),  # fmt: skip
        ),
    ),
    Formula(
        "cohere", "Cohere, Cohere2: LayerNorm without bias in float32, (f32(w) * x-hat).to(x.dtype)",
        "variance_epsilon", _cohere,
        (
            Body((
                "input_dtype=hidden_states.dtype",
                "hidden_states=hidden_states.to(torch.float32)",
                "mean=hidden_states.mean(-1,keepdim=True)",
                "variance=(hidden_states-mean).pow(2).mean(-1,keepdim=True)",
                "hidden_states=(hidden_states-mean)*torch.rsqrt(variance+self.variance_epsilon)",
                "hidden_states=self.weight.to(torch.float32)*hidden_states",
                "returnhidden_states.to(input_dtype)",
            )),  # fmt: skip
        ),
        kind="layer",
    ),
    Formula(
        "deberta", "DeBERTa (1): LayerNorm in float32, x-hat cast to x.dtype, then w * x-hat + b",
        "variance_epsilon", _deberta,
        (
            Body((
                "input_type=hidden_states.dtype",
                "hidden_states=hidden_states.float()",
                "mean=hidden_states.mean(-1,keepdim=True)",
                "variance=(hidden_states-mean).pow(2).mean(-1,keepdim=True)",
                "hidden_states=(hidden_states-mean)/torch.sqrt(variance+self.variance_epsilon)",
                "hidden_states=hidden_states.to(input_type)",
                "y=self.weight*hidden_states+self.bias",
                "returny",
            )),  # fmt: skip
        ),
        _deberta_add,
        kind="layer",
    ),
    Formula(
        "olmo", "OLMo (1): LayerNorm without weight or bias in float32, eps 1e-5, cast to x.dtype", None, _olmo,
        (
            Body((
                "orig_dtype=hidden_states.dtype",
                "returnF.layer_norm(hidden_states.to(dtype=torch.float32),self.normalized_shape,None,None,"
                "eps=1e-05).to(orig_dtype)",
            )),  # fmt: skip
        ),
        _olmo_add,
        kind="layer",
        weighted=False,
        eps_value=1e-05,
    ),
    # subclasses of torch's LayerNorm whose forward never reaches torch's (``patch`` swaps them by
    # what they compute, below them in the method resolution order nothing would run)
    Formula(
        "squeezebert", "SqueezeBERT: torch's LayerNorm over dim 1 of (batch, channels, length)", "eps", _squeezebert,
        (Body(("x=x.permute(0,2,1)", "x=nn.LayerNorm.forward(self,x)", "returnx.permute(0,2,1)")),),
        kind="layer",
        feature_dim=1,
    ),
    Formula(
        "videoprism", "VideoPrism: torch's LayerNorm with weight 1 + w", "eps", _videoprism,
        (Body(("returnF.layer_norm(hidden_states,self.normalized_shape,self.weight+1.0,self.bias,self.eps)",)),),
        kind="layer",
    ),
    Formula(
        "esmfold2", "ESMFold 2: torch's LayerNorm of f32(x), cast to x.dtype", "eps", _esmfold2,
        (
            Body((
                (
                    "returnF.layer_norm(hidden_states.float(),self.normalized_shape,self.weight,self.bias,"
                    "self.eps).to(hidden_states.dtype)"
                ),
            )),
        ),
        kind="layer",
    ),
)


def body_statements(function) -> tuple[str, ...] | None:
    """A function's body as whitespace-free statement strings (no docstring, no comments)."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        return None
    statements = []
    for statement in node.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # docstring
        statements.extend(_flatten(statement))
    return tuple(statements)


def _flatten(statement: ast.stmt) -> list[str]:
    """One string per statement, an ``if``'s header and body as separate entries."""
    if isinstance(statement, ast.If) and not statement.orelse:
        out = [f"if{ast.unparse(statement.test)}:".replace(" ", "")]
        for inner in statement.body:
            out.extend(_flatten(inner))
        return out
    return ["".join(ast.unparse(statement).split())]


def recognize(cls: type) -> Formula | None:
    """The formula a (non-torch) norm class computes, from its forward's statements (and its
    ``_norm`` helper's, where the forward calls one)."""
    body = body_statements(cls.forward)
    if body is None:
        return None
    for formula in HF_FORMULAS:
        for known in formula.bodies:
            if body == known.forward and (
                known.norm is None or body_statements(getattr(cls, "_norm", None)) == known.norm
            ):
                return replace(formula, eps_attr=known.eps_attr or formula.eps_attr, unset=known.unset)
    return None


def probe_agrees(module: torch.nn.Module, formula: Formula) -> str | None:
    """Run the module's own forward and normfuse's on random inputs in float32 and bfloat16 (with
    random weights on a copy): None if they agree to rounding, else what differed."""
    for name in formula.unset:
        if getattr(module, name, None) is not None:
            return f"{name}={getattr(module, name)!r}: its forward then computes another formula"
    weight = getattr(module, "weight", None)
    # a LayerNorm built without affine (elementwise_affine=False) holds no weight
    scaled = formula.weighted and getattr(module, "with_scale", True) and not (formula.kind == "layer" and weight is None)
    if scaled and (not isinstance(weight, torch.Tensor) or weight.dim() != 1):
        # e.g. Cohere's per-head query/key norms: a (heads, head_dim) weight over the last dim
        shape = None if weight is None else tuple(weight.shape)
        return f"weight of shape {shape}: normfuse's formulas take one weight per feature of the last dim"
    compared = False
    for dtype in (torch.float32, torch.bfloat16):
        probe = copy.deepcopy(module).to(device="cpu", dtype=dtype)
        with torch.no_grad():
            if scaled:
                probe.weight.normal_(0.5, 0.3)
            if isinstance(getattr(probe, "bias", None), torch.Tensor):
                probe.bias.normal_(0.0, 0.3)
            # a weightless norm takes any width, but for one that keeps its normalized_shape (OLMo's)
            n = probe.weight.shape[-1] if scaled else getattr(probe, "normalized_shape", (48,))[-1]
            shape = (4, n) if formula.feature_dim == -1 else (2, n, 3)
            x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
            want, refused = _outcome(type(module).forward, probe, x)
            got, got_refused = _outcome(formula.forward, probe, x, formula.eps(probe))
        if refused or got_refused:
            # the class refuses a dtype (ESMFold 2's float32 input with 16-bit parameters, say):
            # normfuse must refuse it as well
            if type(refused) is not type(got_refused):
                return f"{dtype} probe: the class raises {refused!r}, normfuse {got_refused!r}"
            continue
        compared = True
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{dtype} probe: normfuse gives {got.dtype} {tuple(got.shape)}, the class {want.dtype} {tuple(want.shape)}"
        scale = want.float().abs().max().item() + 1e-30
        err = (got.float() - want.float()).abs().max().item() / scale
        bound = 1e-5 if dtype == torch.float32 else 1e-2  # a few units in the last place
        if not err <= bound:
            return f"{dtype} probe: normfuse differs from the class by {err:.2e} (relative), over {bound:.0e}"
    return None if compared else f"the class raises on the probe's input in every dtype: {refused!r}"


def _outcome(function: Callable[..., Tensor], *args) -> tuple[Tensor | None, Exception | None]:
    try:
        return function(*args), None
    except (RuntimeError, TypeError, ValueError) as error:
        return None, error


# A post-norm output block whose residual add and norm can be fused exactly: BERT's self-output
# and output (dense, dropout, the norm of the residual sum), copied verbatim by RoBERTa, ELECTRA,
# XLM-R and some 80 classes more, with ``forward(self, hidden_states, input_tensor)``.
POSTNORM_OUTPUT_BODY = (
    "hidden_states=self.dense(hidden_states)",
    "hidden_states=self.dropout(hidden_states)",
    "hidden_states=self.LayerNorm(hidden_states+input_tensor)",
    "returnhidden_states",
)


def is_postnorm_output(cls: type) -> bool:
    """Whether ``cls.forward`` is the post-norm output block above, with its two arguments."""
    if body_statements(cls.forward) != POSTNORM_OUTPUT_BODY:
        return False
    parameters = list(inspect.signature(cls.forward).parameters.values())
    return [(p.name, p.kind, p.default) for p in parameters] == [
        (name, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)
        for name in ("self", "hidden_states", "input_tensor")
    ]
