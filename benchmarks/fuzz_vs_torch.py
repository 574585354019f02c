"""A differential fuzz of normfuse's functional ops against torch's, judged by a float64 oracle.

    python benchmarks/fuzz_vs_torch.py [--seed 0] [--cases 400] [--compile-cases 0] [--extras 0]
                                       [--backend auto|cpu|triton|reference] [--wide-paths]

Draws random calls of ``layer_norm``, ``rms_norm``, ``add_layer_norm`` and ``add_rms_norm``: every
dtype, float32 parameters under bf16/fp16 input, one or two normalized dims, zero to two leading
dims (zero rows included), contiguous, transposed, strided and expanded inputs, rows far from
zero, rows holding NaN, Inf, 0 or 1e30, finite rows whose squares overflow, eps from 0 to 0.5,
with and without gradients. Each call runs through normfuse and through torch (``F.layer_norm``,
``F.rms_norm``, ``x + r`` before them); where the two differ beyond the dtype's tolerance both are
measured against torch in float64 on the same (rounded) inputs, and the case is reported only
where normfuse is the worse of the two (more than twice torch's error and over the tolerance;
gradients where torch's own error is past 100% are left out as ill-conditioned), where normfuse
gives NaN in more elements than torch, where normfuse raises and torch does not, or where an
input changed. Cases where only torch is off (its fp16/bf16 output at large row means, its CPU
backward at large means, its NaN for some finite rows whose squares overflow, its backward error
for fp16 input with only an fp32 bias) are counted, not reported. ``--compile-cases`` also
compiles that many random calls with ``torch.compile(fullgraph=True)`` (static and dynamic
shapes) and compares them, gradients included, with the eager calls.

``--extras N`` draws N calls with the options no torch function has: dropout (p from 0 to 1, in
training and eval mode), a float32 residual stream under bf16/fp16, no residual, the family
formulas of ``rms_norm`` and ``add_rms_norm`` (Gemma's ``1 + w``, Llama's and T5's x-hat rounded
before the weight), and the modules' ``residual=`` path. They are judged against a float64
transcription of what the option means, through the dropout mask normfuse returns (a wrong mask
in the backward shows as a wrong dx), and against the same transcription as plain torch ops in
float32, which tells rounding residues from faults as torch's own results do above; the keep
rate is held to binomial bounds, the output dtypes to the documented rules, and a module to the
functional op it calls, bit for bit under one seed. With ``--compile-cases`` as many of these
calls are also compiled and judged the same way.

``--backend`` forces one backend for every call (``normfuse.use_backend``). The Triton kernels
run without a GPU under ``TRITON_INTERPRET=1`` (some 2 cases a second); there the interpreter's
fp32-to-bf16 cast, which truncates, is made to round to nearest even as a GPU's does
(``interpreter_rounds_bf16_like_gpus``, as in the test suite), or rows far from zero would read
as faults of the kernels. ``--wide-paths`` lowers the Triton backend's row limits and chunks to
64 features, so that the wide-row kernels (the looped forward, the split and the looped
backward, alternating) run on the fuzz's small rows.

Not a test (it takes minutes and its verdicts need reading); what it found is in the tests. The
twentieth session's runs found the rows whose squares overflow (NaN on the CPU, outputs of 1e32
from the Triton kernels; see the README's Numerics); the options' cases, added in the
twenty-first, found nothing of normfuse's (a backward given the wrong dropout seed on purpose
fails 14 of 150 of them).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import warnings

import torch
import torch.nn.functional as F

import normfuse
from normfuse import ops

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = list(TOL)
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def _machine_eps(dtype: torch.dtype) -> float:
    """RMSNorm's eps=None: the machine epsilon of the computation dtype (float32 but for float64)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _values(rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
    t = torch.randn(shape, dtype=torch.float64)
    if layout == "far from zero":
        t = t * rng.choice([1e-3, 1.0, 10.0]) + rng.choice([1e2, 1e4, -3e3])
    elif layout == "special" and t.numel():
        flat = t.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e30, 0.0])
    elif layout == "huge" and t.numel():
        # finite values whose squares overflow the accumulation dtype (fp16: its largest values)
        big = {torch.float64: 1e200, torch.float16: 6e4}.get(dtype, 1e30)
        flat = t.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = rng.choice([big, -big, big / 7])
    t = t.to(dtype)
    if layout == "transposed" and len(shape) >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        t = torch.stack([t, t], dim=-1)[..., 0]
    elif layout == "expanded" and len(shape) >= 2:
        t = t[:1].expand(shape)
    return t


def _rounded(a: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and the float64 reference rounded to a's dtype (the best a can hold: a gradient past
    fp16's range is inf in the oracle too), in float64, with equal infinities set to 0."""
    a64, ref = a.detach().double(), ref.detach().to(a.dtype).double()
    same_inf = a64.isinf() & (a64 == ref)
    return a64.masked_fill(same_inf, 0.0), ref.masked_fill(same_inf, 0.0)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |a - ref| / max(|ref|, 1) over the elements where neither is NaN."""
    a64, ref = _rounded(a, ref)
    both = ~(a64.isnan() | ref.isnan())
    if not both.any():
        return 0.0
    return ((a64[both] - ref[both]).abs() / ref[both].abs().clamp(min=1)).max().item()


def _norm_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||; inf where a holds a NaN that ref does not."""
    a64, ref = _rounded(a, ref)
    if (a64.isnan() & ~ref.isnan()).any():
        return math.inf
    return ((a64 - ref).nan_to_num(nan=0.0).norm() / ref.nan_to_num(nan=0.0).norm().clamp(min=1e-30)).item()


class Case:
    def __init__(self, rng: random.Random, index: int) -> None:
        self.op = rng.choice(OPS)
        self.dtype = rng.choice(DTYPES)
        dims = rng.randint(1, 2)
        self.norm_shape = tuple(rng.choice([1, 2, 3, 7, 16, 33, 64, 100, 255, 768, 1025]) for _ in range(dims))
        if math.prod(self.norm_shape) > 5000:
            self.norm_shape = (self.norm_shape[0], 3)
        lead = tuple(rng.choice([0, 1, 2, 3, 5, 17]) for _ in range(rng.randint(0, 2)))
        self.shape = lead + self.norm_shape
        self.layout = rng.choice(
            ["contiguous", "contiguous", "transposed", "strided", "expanded", "far from zero", "special", "huge"]
        )
        low = self.dtype in (torch.bfloat16, torch.float16)
        param_dtype = torch.float32 if low and rng.random() < 0.2 else self.dtype
        rms = "rms" in self.op
        self.x = _values(rng, self.shape, self.dtype, self.layout)
        self.residual = (
            _values(rng, self.shape, self.dtype, rng.choice(["contiguous", "strided"])) if "add" in self.op else None
        )
        self.weight = (
            (1 + 0.5 * torch.randn(self.norm_shape, dtype=torch.float64)).to(param_dtype)
            if rng.random() < 0.8
            else None
        )
        self.bias = (
            torch.randn(self.norm_shape, dtype=torch.float64).to(param_dtype)
            if not rms and rng.random() < 0.7
            else None
        )
        self.eps = rng.choice([1e-5, 1e-6, 0.0, 0.1, None]) if rms else rng.choice([1e-5, 1e-12, 0.5])
        self.grad = rng.random() < 0.6
        self.text = (f"case {index}: {self.op} {self.dtype} params {param_dtype} shape {self.shape} normalized "
                     f"{self.norm_shape} {self.layout} weight {self.weight is not None} bias {self.bias is not None} "
                     f"eps {self.eps} grad {self.grad}")  # fmt: skip

    def leaves(self, dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
        """Fresh copies of x, residual, weight, bias (in ``dtype`` where given) to differentiate."""
        out = []
        for t in (self.x, self.residual, self.weight, self.bias):
            if t is not None:
                t = (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_(self.grad)
            out.append(t)
        return out

    def run(self, lib: str, x, residual, weight, bias) -> list[torch.Tensor]:
        """The outputs: [out] or [out, residual_out] (torch: ``x + r`` then its norm)."""
        rms = "rms" in self.op
        if lib == "normfuse":
            if self.op == "layer_norm":
                return [normfuse.layer_norm(x, self.norm_shape, weight, bias, self.eps)]
            if self.op == "rms_norm":
                return [normfuse.rms_norm(x, self.norm_shape, weight, self.eps)]
            if self.op == "add_layer_norm":
                return list(normfuse.add_layer_norm(x, residual, self.norm_shape, weight, bias, self.eps))
            return list(normfuse.add_rms_norm(x, residual, self.norm_shape, weight, self.eps))
        h = x + residual if residual is not None else x
        eps = self.eps
        if rms and eps is None:  # eps=None: the machine epsilon of the computation dtype
            eps = _machine_eps(self.dtype)
        out = (
            F.rms_norm(h, self.norm_shape, weight, eps) if rms else F.layer_norm(h, self.norm_shape, weight, bias, eps)
        )
        return [out] if residual is None else [out, h]


def check(case: Case) -> tuple[list[str], list[str]]:
    """(problems of normfuse, notes where only torch was off)."""
    problems, torch_off = [], []
    ours_in, theirs_in = case.leaves(), case.leaves()
    x_before = ours_in[0].detach().clone()
    try:
        ours = case.run("normfuse", *ours_in)
    except Exception as error:  # noqa: BLE001 - any exception is the finding
        try:
            case.run("torch", *theirs_in)
        except Exception:  # noqa: BLE001
            return [], ["both raise"]
        return [f"normfuse raises {type(error).__name__}: {error}"], []
    theirs = case.run("torch", *theirs_in)
    if not torch.equal(ours_in[0].detach().nan_to_num(), x_before.nan_to_num()):
        problems.append("input modified")
    # the oracle: torch in float64 on the rounded inputs (the add's h rounded to the dtype first,
    # and returned as the residual output: its incoming gradient reaches x and the residual)
    h = case.x + case.residual if case.residual is not None else case.x
    oracle_in = [h.double().requires_grad_(case.grad), None] + case.leaves(torch.float64)[2:]
    oracle = case.run("torch", *oracle_in) + ([oracle_in[0]] if case.residual is not None else [])
    tol = TOL[case.dtype] * (4 if case.eps == 0.0 else 1)
    for k, (a, t, ref) in enumerate(zip(ours, theirs, oracle)):
        name = "out" if k == 0 else "residual_out"
        if a.dtype != t.dtype or a.shape != t.shape:
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} where torch gives {t.dtype} {tuple(t.shape)}")
            continue
        if not torch.equal(a.isnan(), t.isnan()):
            (problems if a.isnan().sum() > t.isnan().sum() else torch_off).append(
                f"{name}: NaN at {int(a.isnan().sum())} elements, torch's at {int(t.isnan().sum())}"
            )
            continue
        ours_err, torch_err = _rel_err(a, ref), _rel_err(t, ref)
        if _rel_err(a, t) > tol:
            if ours_err > max(tol, 2 * torch_err) and case.dtype != torch.float64:
                problems.append(f"{name}: error {ours_err:.3g} against float64, torch's {torch_err:.3g}")
            else:
                torch_off.append(f"{name}: torch's error {torch_err:.3g}, normfuse's {ours_err:.3g}")
    if not (case.grad and case.x.numel()) or case.layout in ("special", "huge"):
        return problems, torch_off
    grads_out = [torch.randn_like(t) for t in theirs]
    present = [k for k, t in enumerate(theirs_in) if t is not None]
    ours_g = torch.autograd.grad(ours, [ours_in[k] for k in present], grads_out, allow_unused=True)
    try:
        theirs_g = torch.autograd.grad(theirs, [theirs_in[k] for k in present], grads_out, allow_unused=True)
    except RuntimeError as error:
        return problems, torch_off + [f"torch's backward raises: {error}"]
    # the oracle's x and residual are one leaf, h: their gradients are its gradient
    oracle_leaves = [oracle_in[0], oracle_in[0], oracle_in[2], oracle_in[3]]
    oracle_g = torch.autograd.grad(oracle, [oracle_leaves[k] for k in present], [g.double() for g in grads_out],
                                   allow_unused=True)  # fmt: skip
    for k, a, t, ref in zip(present, ours_g, theirs_g, oracle_g):
        like = next(g for g in (a, t) if g is not None)
        a, t = (g if g is not None else torch.zeros_like(like) for g in (a, t))
        ref = ref if ref is not None else torch.zeros_like(like, dtype=torch.float64)
        ours_err, torch_err = _norm_err(a, ref), _norm_err(t, ref)
        # torch's error past 1: a gradient that is a rounding residue (two features and eps 1e-12:
        # x-hat is ±1 whatever x, and dx cancels to ~1e-11), where neither float32 result means much
        if ours_err > max(10 * TOL[case.dtype], 2 * torch_err) and case.dtype != torch.float64 and torch_err < 1:
            problems.append(f"d{('x', 'residual', 'weight', 'bias')[k]}: error {ours_err:.3g} against float64, "
                            f"torch's {torch_err:.3g}")  # fmt: skip
    return problems, torch_off


def check_compiled(rng: random.Random, index: int) -> list[str]:
    """A random call compiled with fullgraph=True against the same call in eager mode."""
    torch._dynamo.reset()
    case = Case(rng, index)
    case.layout = "contiguous"
    case.x = _values(rng, case.shape, case.dtype, "contiguous")
    dynamic = rng.random() < 0.5

    def call(x, residual, weight, bias):
        return tuple(case.run("normfuse", x, residual, weight, bias))

    eager_in, compiled_in = case.leaves(), case.leaves()
    try:
        eager = call(*eager_in)
        compiled = torch.compile(call, fullgraph=True, dynamic=dynamic)(*compiled_in)
    except Exception as error:  # noqa: BLE001
        return [f"{case.text} (compiled, dynamic={dynamic}): {type(error).__name__}: {error}"]
    problems = []
    for a, c in zip(eager, compiled):
        if a.dtype != c.dtype or a.shape != c.shape or _rel_err(c, a) > TOL[case.dtype]:
            problems.append(f"{case.text} (compiled, dynamic={dynamic}): outputs differ")
    if case.grad and case.x.numel():
        grads_out = [torch.randn_like(a) for a in eager]
        present = [k for k, t in enumerate(eager_in) if t is not None]
        ge = torch.autograd.grad(eager, [eager_in[k] for k in present], grads_out, allow_unused=True)
        gc = torch.autograd.grad(compiled, [compiled_in[k] for k in present], grads_out, allow_unused=True)
        for a, c in zip(ge, gc):
            if (a is None) != (c is None) or (a is not None and _norm_err(c, a) > TOL[case.dtype]):
                problems.append(f"{case.text} (compiled, dynamic={dynamic}): gradients differ")
    return problems


# --- the options around the norms: dropout, the residual stream's dtype, family formulas, modules ---
# No torch function takes these options, so the judge is a float64 transcription of what each
# option means (dropout with the mask normfuse returns; Gemma's 1 + w; Llama's and T5's rounding of
# x-hat before the weight, DeepSeek-V4's of rstd): outputs within the dtype's tolerance of it and
# gradients within ten times that (norm-wise), unless the same transcription as plain torch ops in float32 is off by
# more than half as much (then it is the problem's conditioning, not normfuse). Modules are held
# to the functional op they call: bit for bit, under the same seed.


def _family_out(
    h: torch.Tensor,
    shape: tuple[int, ...],
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    xhat_dtype: torch.dtype | None,
    rstd_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The family formula in h's dtype with its one rounding of x-hat (or of rstd)."""
    dims = tuple(range(-len(shape), 0))
    rstd = torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if rstd_dtype is not None:  # DeepSeek-V4's: straight-through as well
        rstd = rstd + (rstd.detach().to(rstd_dtype).to(h.dtype) - rstd.detach())
    xhat = h * rstd
    if xhat_dtype is not None:  # rounded, with a straight-through gradient (a cast would round it too)
        xhat = xhat + (xhat.detach().to(xhat_dtype).to(h.dtype) - xhat.detach())
    if weight is None:
        return xhat
    return xhat * (weight + weight_offset)


class ExtrasCase:
    def __init__(self, rng: random.Random, index: int) -> None:
        self.op = rng.choice(("add_layer_norm", "add_rms_norm", "rms_norm", "module"))
        self.rms = self.op != "add_layer_norm" and (self.op != "module" or rng.random() < 0.5)
        self.dtype = rng.choice(DTYPES)
        low = self.dtype in (torch.bfloat16, torch.float16)
        self.norm_shape = (rng.choice([1, 2, 7, 64, 100, 768, 1025]),)
        if rng.random() < 0.2:
            self.norm_shape = (rng.choice([2, 3]),) + self.norm_shape
        self.shape = tuple(rng.choice([0, 1, 3, 17]) for _ in range(rng.randint(0, 2))) + self.norm_shape
        self.layout = rng.choice(["contiguous", "contiguous", "transposed", "strided", "far from zero"])
        self.x = _values(rng, self.shape, self.dtype, self.layout)
        residual_dtype_of_tensor = torch.float32 if low and rng.random() < 0.3 else self.dtype
        self.residual = None
        if self.op != "rms_norm" and rng.random() < 0.85:
            self.residual = _values(rng, self.shape, residual_dtype_of_tensor, rng.choice(["contiguous", "strided"]))
        self.residual_dtype = (
            rng.choice([None, None, torch.float32, self.dtype]) if low else rng.choice([None, self.dtype])
        )
        self.p = rng.choice([0.0, 0.0, 0.1, 0.5, 0.9, 1.0])
        self.training = rng.random() < 0.8
        self.weight_offset, self.xhat_dtype = 0.0, None
        if self.rms and self.op != "module" and rng.random() < 0.6:
            family = rng.choice(["gemma", "llama", "t5"])
            self.weight_offset = 1.0 if family == "gemma" else 0.0
            self.xhat_dtype = {"gemma": None, "llama": self.dtype, "t5": rng.choice([self.dtype, torch.float32])}[
                family
            ]
        # DeepSeek-V4's rstd rounding, drawn apart from ``rng`` (from its position, not consuming
        # it) so that the cases of the seeds run before it was added stay as they were
        own = random.Random(f"rstd_dtype {rng.getstate()[1][-1]} {rng.getstate()[1][0]} {index}")
        self.rstd_dtype = None
        if self.rms and self.op != "module" and own.random() < 0.25:
            self.rstd_dtype = self.dtype
        param_dtype = torch.float32 if low and rng.random() < 0.3 else self.dtype
        self.weight = (0.5 * torch.randn(self.norm_shape, dtype=torch.float64)
                       + (0.0 if self.weight_offset else 1.0)).to(param_dtype) if rng.random() < 0.85 else None  # fmt: skip
        self.bias = (
            torch.randn(self.norm_shape, dtype=torch.float64).to(param_dtype)
            if not self.rms and rng.random() < 0.7
            else None
        )
        self.eps = rng.choice([1e-5, 1e-6, None]) if self.rms else rng.choice([1e-5, 1e-12])
        self.grad = rng.random() < 0.6
        self.text = (f"extras case {index}: {self.op}{' rms' if self.rms else ''} {self.dtype} params {param_dtype} "
                     f"shape {self.shape} normalized {self.norm_shape} {self.layout} residual "
                     f"{None if self.residual is None else self.residual.dtype} residual_dtype {self.residual_dtype} "
                     f"p {self.p} training {self.training} weight_offset {self.weight_offset} xhat_dtype "
                     f"{self.xhat_dtype} rstd_dtype {self.rstd_dtype} weight {self.weight is not None} bias {self.bias is not None} eps {self.eps} "
                     f"grad {self.grad}")  # fmt: skip

    def stream_dtype(self) -> torch.dtype:
        """residual_out's dtype: residual_dtype, else the residual's, else x's."""
        return self.residual_dtype or (self.residual.dtype if self.residual is not None else self.dtype)

    def leaves(self) -> list[torch.Tensor | None]:
        return [None if t is None else t.detach().clone().requires_grad_(self.grad)
                for t in (self.x, self.residual, self.weight, self.bias)]  # fmt: skip

    def functional(self, x, residual, weight, bias) -> list[torch.Tensor]:
        """normfuse's functional call: [out] or [out, residual_out, mask]."""
        family = {"weight_offset": self.weight_offset, "xhat_dtype": self.xhat_dtype, "rstd_dtype": self.rstd_dtype}
        if self.op == "rms_norm":
            return [normfuse.rms_norm(x, self.norm_shape, weight, self.eps, **family)]
        common = {"dropout_p": self.p, "training": self.training, "residual_dtype": self.residual_dtype,
                  "return_dropout_mask": True}  # fmt: skip
        if self.rms:
            return list(normfuse.add_rms_norm(x, residual, self.norm_shape, weight, self.eps, **common, **family))
        return list(normfuse.add_layer_norm(x, residual, self.norm_shape, weight, bias, self.eps, **common))

    def oracle(self, outs: list[torch.Tensor], leaves: list[torch.Tensor | None],
               compute: torch.dtype = torch.float64) -> list[torch.Tensor]:  # fmt: skip
        """The transcription in ``compute`` (float64: the oracle; the computation dtype: what plain
        torch ops would give), through the mask normfuse returned, in ``compute``."""
        x, residual, weight, bias = (None if t is None else t.to(compute) for t in leaves)
        h = x
        if self.op != "rms_norm":
            if self.training and self.p > 0:
                h = torch.where(outs[2], h * (0.0 if self.p >= 1 else 1 / (1 - self.p)), 0.0)
            if residual is not None:
                h = h + residual
            # the residual stream's rounding, straight-through for the gradients
            h = h + (h.detach().to(self.stream_dtype()).to(compute) - h.detach())
        eps = self.eps
        if eps is None:
            eps = _machine_eps(self.dtype)
        if self.rms:
            out = _family_out(h, self.norm_shape, weight, eps, self.weight_offset, self.xhat_dtype, self.rstd_dtype)
        else:
            out = F.layer_norm(h, self.norm_shape, weight, bias, eps)
        return [out] if self.op == "rms_norm" else [out, h]


def _conditioning(case: ExtrasCase, h: torch.Tensor) -> float:
    """For a LayerNorm of float64 input, whose oracle is no more precise than normfuse: the largest
    |h| / std of a row of the normalized tensor h (an offset of 1e4 over a spread of 1e-3 leaves
    1e-9 of float64's digits); else 1."""
    if case.dtype != torch.float64 or not h.numel() or case.rms:
        return 1.0
    rows = h.reshape(-1, math.prod(case.norm_shape))
    return max(1.0, (rows.abs().amax(1) / rows.std(1, correction=0).clamp(min=1e-300)).nan_to_num(1.0).max().item())


def _expected_dtypes(case: ExtrasCase) -> list[torch.dtype]:
    out = case.dtype
    if case.xhat_dtype is not None:
        out = case.xhat_dtype if case.weight is None else torch.promote_types(case.xhat_dtype, case.weight.dtype)
    if case.op == "rms_norm":
        return [out]
    return [out, case.stream_dtype(), torch.bool]


def check_extras(case: ExtrasCase, dynamic: bool | None = None) -> list[str]:
    """Problems of normfuse's on one call with the options (empty: none); ``dynamic`` not None:
    the call compiled with ``torch.compile(fullgraph=True, dynamic=dynamic)``."""
    problems = []
    if case.op == "module":
        return check_module(case)
    leaves = case.leaves()
    before = [None if t is None else t.detach().clone() for t in leaves]
    call = case.functional
    if dynamic is not None:
        torch._dynamo.reset()
        call = torch.compile(case.functional, fullgraph=True, dynamic=dynamic)
    try:
        outs = list(call(*leaves))
    except Exception as error:  # noqa: BLE001 - any exception is the finding
        return [f"normfuse raises {type(error).__name__}: {error}"]
    if any(t is not None and not torch.equal(t.detach(), b) for t, b in zip(leaves, before)):
        problems.append("an input changed")
    got = [o.dtype for o in outs]
    if got != _expected_dtypes(case):
        return problems + [f"dtypes {got}, expected {_expected_dtypes(case)}"]
    if case.op != "rms_norm":
        mask = outs[2]
        if mask.shape != case.shape or (not (case.training and case.p > 0) and not mask.all()):
            problems.append(f"mask of shape {tuple(mask.shape)}, {int((~mask).sum())} dropped, without dropout")
        if case.training and case.p >= 1 and mask.any():
            problems.append("p = 1 keeps elements")
        if case.training and 0 < case.p < 1 and mask.numel() >= 2000:
            kept, n = int(mask.sum()), mask.numel()
            sd = math.sqrt(n * case.p * (1 - case.p))
            if abs(kept - n * (1 - case.p)) > 6 * sd:
                problems.append(f"kept {kept} of {n} at p {case.p}")
    # the oracle in float64, and the same transcription as plain torch ops in float32 (the
    # computation dtype but for float64 input, where it only tells a gradient that is a rounding
    # residue): normfuse is at fault only where it is worse than the tolerance and twice the plain ops
    compute = torch.float32
    oracle_in, plain_in = ([None if t is None else t.detach().clone().requires_grad_(case.grad) for t in leaves]
                           for _ in range(2))  # fmt: skip
    oracle, plain = case.oracle(outs, oracle_in), case.oracle(outs, plain_in, compute)
    tol = TOL[case.dtype] * _conditioning(case, oracle[-1].detach())
    for k, (a, ref, t) in enumerate(zip(outs, oracle, plain)):
        name = ("out", "residual_out")[k]
        if not torch.equal(a.isnan(), ref.to(a.dtype).isnan()):
            problems.append(f"{name}: NaN at {int(a.isnan().sum())} elements, the oracle's at {int(ref.isnan().sum())}")
            continue
        err, plain_err = _rel_err(a, ref), _rel_err(t.to(a.dtype), ref)
        if err > max(tol, 2 * plain_err * (case.dtype != torch.float64)):
            problems.append(f"{name}: error {err:.3g} against float64, plain torch's {plain_err:.3g}")
    if not (case.grad and case.x.numel()) or problems:
        return problems
    grads_out = [torch.randn_like(o, dtype=torch.float64).to(o.dtype) for o in outs[: len(oracle)]]
    present = [k for k, t in enumerate(leaves) if t is not None]
    ours_g = torch.autograd.grad(outs[: len(oracle)], [leaves[k] for k in present], grads_out, allow_unused=True)
    oracle_g = torch.autograd.grad(oracle, [oracle_in[k] for k in present], [g.double() for g in grads_out],
                                   allow_unused=True)  # fmt: skip
    plain_g = torch.autograd.grad(plain, [plain_in[k] for k in present], [g.to(compute) for g in grads_out],
                                  allow_unused=True)  # fmt: skip
    # x-hat rounded to a coarser dtype than x's: its gradient is the straight-through one only up
    # to that rounding
    coarse = case.xhat_dtype if case.xhat_dtype is not None and TOL[case.xhat_dtype] > TOL[case.dtype] else case.dtype
    for k, a, ref, t in zip(present, ours_g, oracle_g, plain_g):
        name = f"d{('x', 'residual', 'weight', 'bias')[k]}"
        if a is None or ref is None:
            if (a is None) != (ref is None or not ref.any()):
                problems.append(f"{name}: None where the oracle has one")
            continue
        ours_err, plain_err = _norm_err(a, ref), _norm_err(t.to(a.dtype), ref)
        # plain torch past 100% (float64 input: float32 past 1%): a gradient that is a rounding
        # residue (one feature; a row constant in its dtype), where neither result means much
        if case.dtype == torch.float64:
            plain_err = 0.0 if plain_err < 1e-2 else math.inf
        if ours_err > max(10 * TOL[coarse], 2 * plain_err) and plain_err < 1:
            problems.append(f"{name}: error {ours_err:.3g} against float64, plain torch's {plain_err:.3g}")
    return problems


def check_module(case: ExtrasCase) -> list[str]:
    """A module's residual path against the functional op it calls, bit for bit under one seed."""
    cls = normfuse.RMSNorm if case.rms else normfuse.LayerNorm
    kwargs = {"eps": case.eps} if case.rms else {"eps": case.eps, "bias": case.bias is not None}
    module = cls(case.norm_shape, **kwargs, elementwise_affine=case.weight is not None, dtype=case.dtype,
                 dropout_p=case.p, residual_dtype=case.residual_dtype)  # fmt: skip
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                getattr(module, name).copy_(getattr(case, name) if getattr(case, name) is not None else 0)
    module.train(case.training)
    x, residual, *_ = case.leaves()
    if residual is None:
        residual = torch.zeros_like(x)
    try:
        torch.manual_seed(1234)
        got = module(x, residual=residual)
        torch.manual_seed(1234)
        fn = normfuse.add_rms_norm if case.rms else normfuse.add_layer_norm
        params = (module.weight,) if case.rms else (module.weight, module.bias)
        want = fn(x.detach(), residual.detach(), case.norm_shape, *[None if p is None else p.detach() for p in params],
                  module.eps, dropout_p=case.p, training=case.training, residual_dtype=case.residual_dtype)  # fmt: skip
    except Exception as error:  # noqa: BLE001
        return [f"raises {type(error).__name__}: {error}"]
    if len(got) != 2 or any(a.dtype != b.dtype or not torch.equal(a.nan_to_num(), b.nan_to_num())
                            for a, b in zip(got, want)):  # fmt: skip
        return ["the module's residual path differs from the functional op's"]
    plain = module(x)
    fn_plain = normfuse.rms_norm if case.rms else normfuse.layer_norm
    if not torch.equal(plain.nan_to_num(), fn_plain(x.detach(), case.norm_shape, *params, module.eps).nan_to_num()):
        return ["the module's plain forward differs from the functional op's"]
    return []


def _wide_paths_from_64_features() -> None:
    """The Triton backend's wide-row kernels (looped forward, split or looped backward, chunked
    sums) for rows from 65 features, in chunks of 64: the paths that rows of 16K-32K features and
    more take, on the fuzz's small shapes. The backward's two wide kernels alternate by call."""
    from normfuse.backends import triton as triton_backend

    triton_backend.MAX_FUSED_N = triton_backend.MAX_FUSED_N_FP32 = triton_backend.MAX_FUSED_N_BWD = 64
    for key in ("loop_block_n", "sums_block_n", "split_block_n", "bwd_loop_block_n"):
        triton_backend.TUNING[key] = 64
    triton_backend.clear_config_caches()
    norm_bwd = triton_backend.norm_bwd
    calls = iter(range(1 << 62))

    def alternating_norm_bwd(*args, **kwargs):
        triton_backend.TUNING["bwd_wide"] = ("split", "looped")[next(calls) % 2]
        triton_backend.clear_config_caches()
        return norm_bwd(*args, **kwargs)

    triton_backend.norm_bwd = alternating_norm_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--compile-cases", type=int, default=0)
    parser.add_argument(
        "--extras", type=int, default=0, help="cases of dropout, residual dtypes, family options, modules"
    )
    parser.add_argument(
        "--backend", choices=["auto", *ops.BACKENDS], default="auto",
        help="force a backend (triton without a GPU: TRITON_INTERPRET=1, and few cases: the interpreter is slow)",
    )  # fmt: skip
    parser.add_argument(
        "--wide-paths", action="store_true",
        help="Triton: row limits and chunks of 64 features, so rows from 65 features take the wide-row kernels",
    )  # fmt: skip
    args = parser.parse_args()
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        from normfuse.backends import triton as triton_backend

        if not triton_backend.interpreter_rounds_bf16_like_gpus():
            print("this Triton's interpreter truncates fp32 to bf16: rows far from zero may read as faults")
    if args.wide_paths:
        _wide_paths_from_64_features()
    with normfuse.use_backend(None if args.backend == "auto" else args.backend):
        run(args)


def run(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    n_problems = n_torch_off = 0
    for index in range(args.cases):
        case = Case(rng, index)
        problems, torch_off = check(case)
        n_torch_off += bool(torch_off)
        if problems:
            n_problems += 1
            print(case.text)
            for line in problems:
                print("   ", line)
    for index in range(args.compile_cases):
        for line in check_compiled(rng, index):
            n_problems += 1
            print(line)
        if args.extras:  # the options compiled too, judged as in eager mode
            case = ExtrasCase(rng, index)
            case.op = "add_rms_norm" if case.op == "module" and case.rms else case.op
            case.op = "add_layer_norm" if case.op == "module" else case.op
            dynamic = rng.random() < 0.5
            if problems := check_extras(case, dynamic):
                n_problems += 1
                print(f"{case.text} (compiled, dynamic={dynamic})")
                for line in problems:
                    print("   ", line)
    for index in range(args.extras):
        case = ExtrasCase(rng, index)
        if problems := check_extras(case):
            n_problems += 1
            print(case.text)
            for line in problems:
                print("   ", line)
    print(f"seed {args.seed}: {args.cases} cases, {args.compile_cases} compiled, {args.extras} with options; {n_problems} with a problem of "
          f"normfuse's, {n_torch_off} where only torch was off")  # fmt: skip
    raise SystemExit(1 if n_problems else 0)


if __name__ == "__main__":
    main()
