"""A differential fuzz of normfuse's functional ops against torch's, judged by a float64 oracle.

    python benchmarks/fuzz_vs_torch.py [--seed 0] [--cases 400] [--compile-cases 0]

Draws random calls of ``layer_norm``, ``rms_norm``, ``add_layer_norm`` and ``add_rms_norm``: every
dtype, float32 parameters under bf16/fp16 input, one or two normalized dims, zero to two leading
dims (zero rows included), contiguous, transposed, strided and expanded inputs, rows far from
zero, rows holding NaN, Inf, 0 or 1e30, eps from 0 to 0.5, with and without gradients. Each
call runs through normfuse and through torch (``F.layer_norm``, ``F.rms_norm``, ``x + r`` before
them); where the two differ beyond the dtype's tolerance both are measured against torch in
float64 on the same (rounded) inputs, and the case is reported only where normfuse is the worse
of the two (more than twice torch's error and over the tolerance; gradients where torch's own error
is past 100% are left out as ill-conditioned), where normfuse gives NaN in more elements than
torch, where normfuse raises and torch does not, or where an input changed. Cases where only torch is off (its
fp16/bf16 output at large row means, its CPU backward at large means, its NaN for some finite
rows whose squares overflow, its backward error for fp16 input with only an fp32 bias) are
counted, not reported. ``--compile-cases`` also compiles that many random calls with
``torch.compile(fullgraph=True)`` (static and dynamic shapes) and compares them, gradients
included, with the eager calls.

Not a test (it takes minutes and its verdicts need reading); what it found is in the tests. The
twentieth session's runs found the rows whose squares overflow (NaN on the CPU, outputs of 1e32
from the Triton kernels; see the README's Numerics).
"""

from __future__ import annotations

import argparse
import math
import random
import warnings

import torch
import torch.nn.functional as F

import normfuse

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = list(TOL)
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def _values(rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
    t = torch.randn(shape, dtype=torch.float64)
    if layout == "far from zero":
        t = t * rng.choice([1e-3, 1.0, 10.0]) + rng.choice([1e2, 1e4, -3e3])
    elif layout == "special" and t.numel():
        flat = t.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e30, 0.0])
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
        self.layout = rng.choice(["contiguous", "contiguous", "transposed", "strided", "expanded", "far from zero", "special"])
        low = self.dtype in (torch.bfloat16, torch.float16)
        param_dtype = torch.float32 if low and rng.random() < 0.2 else self.dtype
        rms = "rms" in self.op
        self.x = _values(rng, self.shape, self.dtype, self.layout)
        self.residual = _values(rng, self.shape, self.dtype, rng.choice(["contiguous", "strided"])) if "add" in self.op else None
        self.weight = (1 + 0.5 * torch.randn(self.norm_shape, dtype=torch.float64)).to(param_dtype) if rng.random() < 0.8 else None
        self.bias = torch.randn(self.norm_shape, dtype=torch.float64).to(param_dtype) if not rms and rng.random() < 0.7 else None
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
            eps = torch.finfo(torch.float64 if self.dtype == torch.float64 else torch.float32).eps
        out = F.rms_norm(h, self.norm_shape, weight, eps) if rms else F.layer_norm(h, self.norm_shape, weight, bias, eps)
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
                f"{name}: NaN at {int(a.isnan().sum())} elements, torch's at {int(t.isnan().sum())}")
            continue
        ours_err, torch_err = _rel_err(a, ref), _rel_err(t, ref)
        if _rel_err(a, t) > tol:
            if ours_err > max(tol, 2 * torch_err) and case.dtype != torch.float64:
                problems.append(f"{name}: error {ours_err:.3g} against float64, torch's {torch_err:.3g}")
            else:
                torch_off.append(f"{name}: torch's error {torch_err:.3g}, normfuse's {ours_err:.3g}")
    if not (case.grad and case.x.numel()) or case.layout == "special":
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--compile-cases", type=int, default=0)
    args = parser.parse_args()
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
    print(f"seed {args.seed}: {args.cases} cases, {args.compile_cases} compiled; {n_problems} with a problem of "
          f"normfuse's, {n_torch_off} where only torch was off")  # fmt: skip
    raise SystemExit(1 if n_problems else 0)


if __name__ == "__main__":
    main()
