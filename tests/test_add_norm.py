"""add_layer_norm / add_rms_norm: the fused pre-norm step against the unfused torch pair and the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import normfuse
from normfuse import _dropout, reference
from tests._helpers import FWD_TOL, max_rel_err, norm_err, per_thread_count

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
KINDS = {"layer": (normfuse.add_layer_norm, F.layer_norm), "rms": (normfuse.add_rms_norm, F.rms_norm)}


def _params(kind, n, dtype, device="cpu"):
    w = (1 + 0.5 * torch.randn(n, dtype=torch.float64)).to(dtype).to(device)
    b = (0.5 * torch.randn(n, dtype=torch.float64)).to(dtype).to(device) if kind == "layer" else None
    return w, b


def _fused(kind, x, r, n, w, b, **kwargs):
    fn = KINDS[kind][0]
    return fn(x, r, (n,), w, b, **kwargs) if kind == "layer" else fn(x, r, (n,), w, **kwargs)


def _unfused(kind, x, r, n, w, b, residual_dtype=None):
    """What a pre-norm block does without normfuse: add (in the residual's dtype), then norm."""
    h = x.to(residual_dtype or r.dtype) + r if r is not None else x.to(residual_dtype or x.dtype)
    norm = KINDS[kind][1]
    if h.dtype != w.dtype:  # a float32 stream: the norm runs in float32
        w, b = w.to(h.dtype), b.to(h.dtype) if b is not None else None
    out = norm(h, (n,), w, b) if kind == "layer" else norm(h, (n,), w)
    return out.to(x.dtype), h


def _run_both(fn, inputs, grads_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs[:2], wanted, grads_out)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_kind", ["same", "fp32", "none"])
def test_matches_unfused_torch_pair_with_gradients_through_both_outputs(kind, dtype, residual_kind, device):
    if residual_kind == "fp32" and dtype not in (torch.bfloat16, torch.float16):
        pytest.skip("a float32 residual stream is for bf16/fp16 activations")
    n = 96
    x = torch.randn(3, 10, n, dtype=torch.float64).to(dtype).to(device)
    r_dtype = torch.float32 if residual_kind == "fp32" else dtype
    r = (2 * torch.randn(3, 10, n, dtype=torch.float64)).to(r_dtype).to(device) if residual_kind != "none" else None
    w, b = _params(kind, n, dtype, device)
    dout = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    dres = torch.randn(x.shape, dtype=torch.float64).to(r_dtype).to(device)
    (out, h), grads = _run_both(lambda *a: _fused(kind, *a[:2], n, *a[2:]), (x, r, w, b), (dout, dres))
    (tout, th), tgrads = _run_both(lambda *a: _unfused(kind, a[0], a[1], n, *a[2:]), (x, r, w, b), (dout, dres))
    assert out.dtype == dtype and h.dtype == r_dtype and out.shape == h.shape == x.shape
    assert torch.equal(h, th)  # one rounding of the same sum
    assert max_rel_err(out, tout) <= 2 * FWD_TOL[dtype]
    ref_out = reference.layer_norm(h.cpu(), (n,), w.cpu(), b.cpu() if b is not None else None,
                                   1e-5 if kind == "layer" else torch.finfo(h.dtype if h.dtype == torch.float64 else torch.float32).eps,
                                   rms=kind == "rms")  # fmt: skip
    assert max_rel_err(out.cpu(), ref_out) <= FWD_TOL[dtype]
    for got, want in zip(grads, tgrads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert norm_err(got, want) <= 2 * GRAD_TOL[dtype]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("used", ["out", "residual_out"])
def test_gradients_where_one_output_goes_unused(kind, used):
    """A post-norm block (BERT's) uses the norm's output alone; a stream's last step may use
    residual_out alone. The unused output's gradient is not made a tensor of zeros (that fill and
    its read cost more than the rest of the backward), and the gradients are the unfused pair's."""
    n = 64
    x, r = torch.randn(4, 7, n, dtype=torch.float64), torch.randn(4, 7, n, dtype=torch.float64)
    w, b = _params(kind, n, torch.float64)
    dy = torch.randn(4, 7, n, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
        out, h = fn(*leaves)
        wanted = [t for t in leaves if t is not None]
        got = torch.autograd.grad(out if used == "out" else h, wanted, dy, allow_unused=True)
        return [g if g is not None else torch.zeros_like(t) for g, t in zip(got, wanted)]

    fused = grads(lambda x_, r_, w_, b_: _fused(kind, x_, r_, n, w_, b_))
    unfused = grads(lambda x_, r_, w_, b_: _unfused(kind, x_, r_, n, w_, b_))
    for got, want in zip(fused, unfused):
        assert norm_err(got, want) <= GRAD_TOL[torch.float64]


@pytest.mark.parametrize("kind", list(KINDS))
def test_x_and_residual_gradients_share_a_tensor_and_accumulate_apart(kind):
    """Without dropout, and with x and the residual of one dtype, their gradients are the same
    values and the backward writes them once (one tensor for both, as torch's add backward
    returns); accumulated into the leaves' .grad they stay apart."""
    n = 32
    x, r = torch.randn(5, n, requires_grad=True), torch.randn(5, n, requires_grad=True)
    w, b = _params(kind, n, torch.float32)
    dy = torch.randn(5, n)
    dx, dr = torch.autograd.grad(_fused(kind, x, r, n, w, b)[0], [x, r], dy)
    assert torch.equal(dx, dr)
    for _ in range(2):
        out, _ = _fused(kind, x, r, n, w, b)
        (out * dy).sum().backward()
    assert torch.equal(x.grad, 2 * dx) and torch.equal(r.grad, 2 * dx)
    x.grad.zero_()
    assert torch.equal(r.grad, 2 * dx)
    # one tensor as both x and the residual: its gradient is the sum of the two
    (both,) = torch.autograd.grad(_fused(kind, x, x, n, w, b)[0], [x], dy)
    x2 = (2 * x).detach().requires_grad_()
    (want,) = torch.autograd.grad(KINDS[kind][1](x2, (n,), w, b) if kind == "layer" else KINDS[kind][1](x2, (n,), w), [x2], dy)
    assert norm_err(both, 2 * want) <= GRAD_TOL[torch.float32]
    # with dropout, or a residual of another dtype, the two differ: each written as it is
    dx, dr = torch.autograd.grad(_fused(kind, x, r, n, w, b, dropout_p=0.5)[0], [x, r], dy)
    assert torch.equal(dx, torch.where(dx == 0, 0.0, 2 * dr)) and (dx == 0).any()
    x16 = x.detach().bfloat16().requires_grad_()  # a float32 residual stream under bf16 activations
    dx, dr = torch.autograd.grad(_fused(kind, x16, r, n, w, b)[0], [x16, r], dy.bfloat16())
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32 and torch.equal(dx, dr.bfloat16())


@pytest.mark.parametrize("kind", list(KINDS))
def test_residual_dtype_keeps_a_float32_stream(kind):
    x = torch.randn(8, 64).bfloat16()
    r = torch.randn(8, 64).bfloat16()
    w, b = _params(kind, 64, torch.bfloat16)
    out, h = _fused(kind, x, r, 64, w, b, residual_dtype=torch.float32)
    assert h.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(h, x.float() + r.float())


# --- dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_scale_and_keep_rate(kind, p):
    rows, n = 64, 512
    x, r = torch.randn(rows, n), torch.randn(rows, n)
    w, b = _params(kind, n, torch.float32)
    out, h, mask = _fused(kind, x, r, n, w, b, dropout_p=p, return_dropout_mask=True)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(h, torch.where(mask, x * (1 / (1 - p)), 0.0) + r)
    # keep rate within 5 standard deviations of the binomial's mean
    total = rows * n
    kept = mask.sum().item()
    assert abs(kept - total * (1 - p)) <= 5 * math.sqrt(total * p * (1 - p))
    # rows and columns are not correlated: each row's and each column's rate is plausible too
    assert (mask.float().mean(1) - (1 - p)).abs().max() <= 6 * math.sqrt(p * (1 - p) / n)
    assert (mask.float().mean(0) - (1 - p)).abs().max() <= 6 * math.sqrt(p * (1 - p) / rows)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_uses_exactly_the_forwards_mask(kind, dtype):
    n = 200
    x = torch.randn(16, n).to(dtype).requires_grad_()
    r = torch.randn(16, n).to(dtype).requires_grad_()
    w, b = _params(kind, n, dtype)
    out, h, mask = _fused(kind, x, r, n, w, b, dropout_p=0.3, return_dropout_mask=True)
    dx, dr = torch.autograd.grad((out, h), (x, r), (torch.randn_like(out), torch.randn_like(h)))
    # dresidual is the gradient at h; dx is it through the same mask and scale
    assert not dx[~mask].any()
    expected = torch.where(mask, dr.float() * (1 / 0.7), 0.0).to(dtype)
    assert max_rel_err(dx, expected) <= FWD_TOL[dtype]


def test_dropout_is_reproduced_by_manual_seed_and_differs_between_calls():
    x, r = torch.randn(32, 128), torch.randn(32, 128)
    torch.manual_seed(7)
    first = normfuse.add_rms_norm(x, r, (128,), dropout_p=0.4, return_dropout_mask=True)
    second = normfuse.add_rms_norm(x, r, (128,), dropout_p=0.4, return_dropout_mask=True)
    torch.manual_seed(7)
    again = normfuse.add_rms_norm(x, r, (128,), dropout_p=0.4, return_dropout_mask=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], second[2])


def test_cpu_masks_are_the_shared_hash():
    x = torch.randn(40, 77)
    torch.manual_seed(3)
    seed = int(_dropout.draw_seed())
    torch.manual_seed(3)
    mask = normfuse.add_layer_norm(x, None, (77,), dropout_p=0.25, return_dropout_mask=True)[2]
    assert torch.equal(mask, _dropout.keep_mask(seed, 0.25, 40, 77))


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_dropout_cases_are_bitwise_the_plain_add(kind):
    x, r = torch.randn(16, 64), torch.randn(16, 64)
    w, b = _params(kind, 64, torch.float32)
    plain = _fused(kind, x, r, 64, w, b)
    assert torch.equal(plain[1], x + r)
    for kwargs in ({"dropout_p": 0.0}, {"dropout_p": 0.5, "training": False}):
        out, h, mask = _fused(kind, x, r, 64, w, b, return_dropout_mask=True, **kwargs)
        assert torch.equal(out, plain[0]) and torch.equal(h, plain[1]) and bool(mask.all())


@pytest.mark.parametrize("kind", list(KINDS))
def test_p_one_drops_everything(kind):
    x, r = torch.randn(16, 64), torch.randn(16, 64)
    w, b = _params(kind, 64, torch.float32)
    out, h, mask = _fused(kind, x, r, 64, w, b, dropout_p=1.0, return_dropout_mask=True)
    assert torch.equal(h, r) and not mask.any()
    assert torch.equal(out, _fused(kind, torch.zeros_like(x), r, 64, w, b)[0])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_nan_and_inf_take_no_part_in_the_sum(kind, dtype):
    """The mask selects (``F.dropout`` multiplies by 0, which keeps a NaN and makes an Inf NaN)."""
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0] * 32, dtype=dtype).reshape(4, 32)
    r = torch.randn(4, 32, dtype=dtype)
    w, b = _params(kind, 32, dtype)
    for p in (0.5, 1.0):
        _, h, mask = _fused(kind, x, r, 32, w, b, dropout_p=p, return_dropout_mask=True)
        assert not mask.all() and torch.equal(h[~mask], r[~mask])
        assert torch.equal(h[mask].isnan(), x[mask].isnan())


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_p_outside_unit_interval_is_refused_like_torch(p):
    with pytest.raises(ValueError) as theirs:
        F.dropout(torch.randn(2), p)
    for fn in (normfuse.add_layer_norm, normfuse.add_rms_norm):
        with pytest.raises(ValueError) as ours:
            fn(torch.randn(2, 4), None, (4,), dropout_p=p)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError):
        normfuse.LayerNorm(4, dropout_p=p)


# --- gradcheck, errors, compile -----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_and_gradgradcheck(kind, p, device):
    n = 6
    x = torch.randn(4, n, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(4, n, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, device=device, requires_grad=True) if kind == "layer" else None

    def fn(*args):
        torch.manual_seed(11)  # the same dropout mask on every evaluation
        return _fused(kind, args[0], args[1], n, args[2], args[3] if kind == "layer" else None, dropout_p=p, eps=1e-5)

    inputs = (x, r, w, b) if kind == "layer" else (x, r, w)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


_x = torch.randn(3, 5)
RESIDUAL_ERRORS = {
    "shape": (lambda fn: fn(_x, torch.randn(3, 4), (5,)), RuntimeError, r"residual of shape \[3, 4\] does not match x of shape \[3, 5\]"),
    "dtype": (lambda fn: fn(_x, _x.double(), (5,)), RuntimeError, "residual of dtype torch.float64 does not go with x of dtype torch.float32"),
    "device": (lambda fn: fn(_x, torch.randn(3, 5, device="meta"), (5,)), RuntimeError, "residual is on device meta but x is on device cpu"),
    "residual_dtype int": (lambda fn: fn(_x, None, (5,), residual_dtype=torch.int32), TypeError, "residual_dtype must be a floating point"),
    "residual_dtype f16 for f32": (lambda fn: fn(_x, None, (5,), residual_dtype=torch.float16), RuntimeError, "residual_dtype torch.float16 does not go with x"),
    "residual not a tensor": (lambda fn: fn(_x, 3, (5,)), TypeError, "argument 'residual' must be Tensor or None"),
    "x not a tensor": (lambda fn: fn([[1.0] * 5], _x, (5,)), TypeError, r"argument 'x' \(position 1\) must be Tensor, not list"),
    "trailing shape": (lambda fn: fn(_x, _x, (4,)), RuntimeError, "expected input with shape"),
}


@pytest.mark.parametrize("case", list(RESIDUAL_ERRORS))
@pytest.mark.parametrize("fn", [normfuse.add_layer_norm, normfuse.add_rms_norm])
def test_errors_name_both_tensors_before_any_kernel(case, fn):
    make, error, message = RESIDUAL_ERRORS[case]
    with pytest.raises(error, match=message):
        make(fn)


def test_inputs_are_never_modified():
    x, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    saved = [t.detach().clone() for t in (x, r, w)]
    out, h = normfuse.add_rms_norm(x, r, (16,), w, dropout_p=0.2)
    (out.sum() + h.sum()).backward()
    assert all(torch.equal(t.detach(), s) for t, s in zip((x, r, w), saved))


class _PreNormBlocks(torch.nn.Module):
    """Pre-norm blocks chained through the residual stream, as in a transformer."""

    def __init__(self, norm_cls, n=32, depth=3):
        super().__init__()
        self.norms = torch.nn.ModuleList(norm_cls(n) for _ in range(depth))
        self.mlps = torch.nn.ModuleList(torch.nn.Linear(n, n) for _ in range(depth))
        for norm in self.norms:
            torch.nn.init.normal_(norm.weight, 1.0, 0.2)

    def forward(self, x):
        residual = None
        hidden = x
        for norm, mlp in zip(self.norms, self.mlps):
            if residual is None:
                residual, hidden = hidden, norm(hidden)
            else:
                hidden, residual = norm(hidden, residual=residual)
            hidden = mlp(hidden)
        return hidden + residual


@pytest.mark.parametrize("norm_cls", [normfuse.LayerNorm, normfuse.RMSNorm])
def test_compile_fullgraph_over_chained_prenorm_blocks(norm_cls):
    torch._dynamo.reset()
    model = _PreNormBlocks(norm_cls)
    x = torch.randn(4, 32, requires_grad=True)
    eager = model(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert max_rel_err(out.detach(), eager.detach()) < 1e-5 and max_rel_err(grad, eager_grad) < 1e-5


# --- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_cls", [normfuse.LayerNorm, normfuse.RMSNorm])
def test_module_residual_path_and_extras(norm_cls):
    plain = norm_cls(16)
    extras = norm_cls(16, dropout_p=0.5, residual_dtype=torch.float32)
    assert "dropout_p=0.5" in repr(extras) and "residual_dtype=torch.float32" in repr(extras)
    assert repr(plain) == repr(getattr(torch.nn, norm_cls.__name__)(16))
    assert list(extras.state_dict()) == list(plain.state_dict())
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    assert isinstance(plain(x), torch.Tensor)
    out, h = plain(x, residual=r)
    assert torch.equal(h, x + r) and torch.equal(out, plain(x + r))
    extras.load_state_dict(plain.state_dict())
    extras.eval()
    out_eval, h_eval = extras(x.bfloat16(), residual=r.bfloat16())
    assert h_eval.dtype == torch.float32 and torch.equal(h_eval, x.bfloat16().float() + r.bfloat16().float())
    extras.train()
    _, h_train = extras(x, residual=r)
    assert not torch.equal(h_train, x + r)  # dropout in training mode only
    with pytest.raises(TypeError, match="residual_dtype"):
        norm_cls(16, residual_dtype="float32")


def test_compile_fullgraph_with_dropout_runs_and_drops():
    torch._dynamo.reset()

    def step(x, r, w):
        return normfuse.add_rms_norm(x, r, (32,), w, dropout_p=0.5, return_dropout_mask=True)

    x, r, w = torch.randn(8, 32), torch.randn(8, 32), torch.randn(32)
    out, h, mask = torch.compile(step, fullgraph=True, backend="aot_eager")(x, r, w)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(h, torch.where(mask, x * 2.0, 0.0) + r)
    assert max_rel_err(out, F.rms_norm(h, (32,), w)) <= 2 * FWD_TOL[torch.float32]


def test_compiled_backward_over_one_feature_with_dropout():
    """One feature takes the exact RMSNorm backward in torch ops, which applies the forward's
    mask from its seed: under torch.compile the seed is a traced tensor (an ``int()`` of it
    failed to compile without a residual; differential fuzz, seed 2502). Gradients against
    float64 autograd of the formula through the returned mask."""
    torch._dynamo.reset()

    def step(x, w):
        return normfuse.add_rms_norm(x, None, (1,), w, 1e-5, dropout_p=0.5, return_dropout_mask=True)

    x, w = (torch.randn(64, 1) * 3).requires_grad_(), torch.randn(1).requires_grad_()
    out, h, mask = torch.compile(step, fullgraph=True)(x, w)
    assert 0 < mask.sum() < mask.numel()
    dout, dh = torch.randn(64, 1), torch.randn(64, 1)
    got = torch.autograd.grad((out, h), (x, w), (dout, dh))
    leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    h64 = torch.where(mask, leaves[0] * 2.0, 0.0)
    out64 = h64 * torch.rsqrt(h64.square() + 1e-5) * leaves[1]
    want = torch.autograd.grad((out64, h64), leaves, (dout.double(), dh.double()))
    for g, t in zip(got, want):
        assert norm_err(g, t) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_bitwise_identical_across_thread_counts_and_calls(dtype):
    """dγ, dx and dresidual of the fused step do not depend on the thread count or on where the
    buffers land (fresh allocations each call)."""
    import numba

    x = torch.randn(4096, 96).to(dtype)
    r = torch.randn(4096, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    dout, dres = torch.randn(4096, 96).to(dtype), torch.randn(4096, 96).to(dtype)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        torch.manual_seed(3)
        out, h = normfuse.add_rms_norm(leaves[0], leaves[1], (96,), leaves[2], dropout_p=0.1)
        return torch.autograd.grad((out, h), leaves, (dout, dres))

    def moved_grads():
        padding = torch.empty(int(torch.randint(1, 64, ())))  # moves where the next tensors land
        result = grads()
        del padding
        return result

    most = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    results = per_thread_count(moved_grads, sorted({1, most}) + [most])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_dropout(use_reentrant):
    # torch.utils.checkpoint replays the forward in backward with the RNG state restored: the
    # replayed step must draw the same dropout mask, so the gradients are bitwise the plain ones
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(8, 32, requires_grad=True)
    r = torch.randn(8, 32, requires_grad=True)
    norm = normfuse.LayerNorm(32, dropout_p=0.3)
    lin = torch.nn.Linear(32, 32)

    def block(a, res):
        out, h = norm(lin(a), residual=res)
        return out.pow(2).sum() + h.sum()

    def grads(loss):
        for t in (x, r, norm.weight):
            t.grad = None
        loss.backward()
        return [t.grad.clone() for t in (x, r, norm.weight)]

    torch.manual_seed(1)
    plain = grads(block(x, r))
    torch.manual_seed(1)
    replayed = grads(checkpoint(block, x, r, use_reentrant=use_reentrant))
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_residual", [True, False])
def test_inference_calls_the_kernels_directly_with_training_s_bits(kind, dtype, p, with_residual, monkeypatch):
    """With nothing to differentiate the add+norm ops skip autograd.Function (whose apply cost 4x
    the kernel on a token): same outputs, same residual, same dropout draws as the training path."""
    x = torch.randn(3, 5, 64).to(dtype)
    r = torch.randn(3, 5, 64).to(dtype) if with_residual else None
    w, b = _params(kind, 64, dtype)
    torch.manual_seed(7)
    training = _fused(kind, x.clone().requires_grad_(), r, 64, w, b, dropout_p=p, return_dropout_mask=True)

    def refuse(*args):
        raise AssertionError("the inference path went through autograd.Function")

    monkeypatch.setattr(normfuse.ops.NormFunction, "apply", refuse)
    torch.manual_seed(7)
    with torch.no_grad():
        inference = _fused(kind, x, r, 64, torch.nn.Parameter(w), b, dropout_p=p, return_dropout_mask=True)
    for got, want in zip(inference, training):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want.detach())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (8, 768), (2, 3, 5), (0, 16)])
def test_token_sized_path_gives_the_general_path_s_bits(kind, dtype, shape, monkeypatch):
    """The add+norm ops' direct path (functional._direct_add_path): nothing to
    differentiate, no dropout, the residual in x's dtype and shape. It skips the general checks
    and gives their path's bits; p > 0 in eval mode is no dropout there too."""
    n = shape[-1]
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    w, b = _params(kind, n, dtype)
    w = torch.nn.Parameter(w)
    with torch.no_grad():
        with normfuse.use_backend("cpu"):  # a forced backend takes the general path
            general = _fused(kind, x, r, n, w, b)
        calls = []
        real = normfuse.functional._check_residual
        monkeypatch.setattr(normfuse.functional, "_check_residual", lambda *a: calls.append(a) or real(*a))
        direct = _fused(kind, x, r, n, w, b)
        eval_mode = _fused(kind, x, r, n, w, b, dropout_p=0.5, training=False)
        assert calls == []
        _fused(kind, x, r, n, w, b, return_dropout_mask=True)  # a mask asked for: the general path
        assert len(calls) == 1
    for outs in (direct, eval_mode):
        for got, want in zip(outs, general):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want)


# every dtype with everything requiring grad; the partial cases (other kernel specializations,
# each a numba compile in CI) in float32
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", [(8, 768), (2, 3, 5), (0, 16)])
@pytest.mark.parametrize(
    "dtype,grads", [(dtype, "all") for dtype in DTYPES] + [(torch.float32, "residual only"), (torch.float32, "weight only")]
)
def test_direct_training_path_gives_the_general_path_s_bits(kind, shape, dtype, grads, monkeypatch):
    """Something requires grad, no dropout, the residual in x's dtype and shape: the direct path
    records the general path's autograd node without the general checks (a list shape takes the
    general path): both outputs and every gradient, through both outputs, bit for bit; eval
    mode with p > 0 too."""
    n = shape[-1]
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    w, b = _params(kind, n, dtype)
    dout, dres = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)

    def run(norm_shape, **kwargs):
        xl, rl = x.clone().requires_grad_(grads == "all"), r.clone().requires_grad_(grads != "weight only")
        wl = torch.nn.Parameter(w.clone()) if grads != "residual only" else w.clone()
        bl = b.clone().requires_grad_(grads == "all") if b is not None else None
        fn = KINDS[kind][0]
        outs = fn(xl, rl, norm_shape, wl, bl, **kwargs) if kind == "layer" else fn(xl, rl, norm_shape, wl, **kwargs)
        wanted = [t for t in (xl, rl, wl, bl) if t is not None and t.requires_grad]
        return [*outs, *torch.autograd.grad(outs, wanted, (dout, dres))]

    general = run([n])
    calls = []
    real = normfuse.functional._check_residual
    monkeypatch.setattr(normfuse.functional, "_check_residual", lambda *a: calls.append(a) or real(*a))
    direct = run((n,))
    eval_mode = run((n,), dropout_p=0.5, training=False)
    assert calls == []
    run((n,), dropout_p=0.5)  # dropout in training: the general path
    assert len(calls) == 1
    for outs in (direct, eval_mode):
        assert len(outs) == len(general)
        for got, want in zip(outs, general):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want)
