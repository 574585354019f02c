"""The custom ops and the choice of backend."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import normfuse
from normfuse import ops, reference
from tests._helpers import FWD_TOL, max_rel_err, skip_where_older_torch_differs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rms", [False, True])
def test_opcheck_forward_and_backward(dtype, rms):
    x = torch.randn(6, 20, dtype=dtype, requires_grad=True)
    w = torch.randn(20, dtype=dtype, requires_grad=True)
    b = torch.randn(20, dtype=dtype, requires_grad=True)
    plain = (None, 0.0, None, False, None, None)
    torch.library.opcheck(torch.ops.normfuse.norm_fwd, (x, None, w, b, 1e-5, rms, *plain))
    torch.library.opcheck(torch.ops.normfuse.norm_fwd, (x, None, None, None, 1e-5, rms, *plain))
    out, _, mean, rstd, _ = torch.ops.normfuse.norm_fwd(x.detach(), None, w.detach(), b.detach(), 1e-5, rms, *plain)
    dy = torch.randn_like(out)
    for mask in [(True, True, True), (True, False, False), (False, True, False)]:
        args = (dy, None, x.detach(), w.detach(), mean, rstd, rms, False, 0.0, None, dtype, None, mask[0], False, *mask[1:])
        torch.library.opcheck(torch.ops.normfuse.norm_bwd, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_residual_add(dtype, dropout_p):
    x = torch.randn(6, 20, dtype=dtype, requires_grad=True)
    r = torch.randn(6, 20, dtype=torch.float32, requires_grad=True)
    w = torch.randn(20, dtype=dtype, requires_grad=True)
    seed = torch.tensor(12345) if dropout_p else None
    args = (x, r, w, None, 1e-5, True, torch.float32, dropout_p, seed, True, None, None)
    torch.library.opcheck(torch.ops.normfuse.norm_fwd, args)
    out, h, mean, rstd, mask = torch.ops.normfuse.norm_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert h.dtype == torch.float32 and out.dtype == dtype and mask.dtype == torch.bool
    dy, dh = torch.randn_like(out), torch.randn_like(h)
    bwd = (dy, dh, h, w.detach(), mean, rstd, True, True, dropout_p, seed, dtype, torch.float32, True, True, True, False)
    torch.library.opcheck(torch.ops.normfuse.norm_bwd, bwd)


def test_cpu_is_chosen_for_cpu_tensors():
    assert ops.backend_name(torch.empty(2, 2)) == "cpu"
    assert ops.backend_name(torch.empty(2, 2, dtype=torch.bfloat16)) == "cpu"


def test_use_backend_forces_and_restores():
    x = torch.empty(2, 2)
    with normfuse.use_backend("reference"):
        assert ops.backend_name(x) == "reference"
        with normfuse.use_backend(None):
            assert ops.backend_name(x) == "cpu"
    assert ops.backend_name(x) == "cpu"
    with pytest.raises(ValueError, match="unknown normfuse backend"):
        with normfuse.use_backend("cuda-magic"):
            pass


def _backend_in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    code = "import torch, normfuse.ops as o; print(o.backend_name(torch.empty(2)))"
    env = {**os.environ, "NORMFUSE_BACKEND": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_forces():
    done = _backend_in_subprocess("reference")
    assert done.returncode == 0 and done.stdout.strip() == "reference", done.stderr
    done = _backend_in_subprocess("nonsense")
    assert done.returncode != 0 and "NORMFUSE_BACKEND='nonsense'" in done.stderr


def test_use_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setattr(ops, "_ENV_BACKEND", "reference")
    assert ops.backend_name(torch.empty(2)) == "reference"
    with normfuse.use_backend("cpu"):
        assert ops.backend_name(torch.empty(2)) == "cpu"


def test_forced_reference_backend_runs_and_agrees():
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    with normfuse.use_backend("reference"):
        out = normfuse.layer_norm(x, (33,), w)
        out.sum().backward()
    ref = reference.layer_norm(x.detach(), (33,), w.detach())
    assert max_rel_err(out.detach(), ref) <= FWD_TOL[torch.float32]
    rdx, rdw, _ = reference.layer_norm_backward(torch.ones(5, 33), x.detach(), (33,), w.detach())
    assert max_rel_err(x.grad, rdx) < 1e-5 and max_rel_err(w.grad, rdw) < 1e-5


def test_forced_triton_backend_where_it_cannot_run_raises(monkeypatch):
    """Forced where its kernels cannot run (no triton, no GPU and no interpreter, or Triton 3.1's
    interpreter, which writes nothing back to CPU tensors), the Triton backend says so before a
    kernel runs, instead of returning outputs that were never written."""
    triton_backend = pytest.importorskip("normfuse.backends.triton")
    monkeypatch.setattr(triton_backend, "available", lambda: False)
    monkeypatch.setattr(ops, "_loaded_backends", {})
    needs = "Triton backend needs triton and a CUDA GPU, or TRITON_INTERPRET=1"
    with normfuse.use_backend("triton"), pytest.raises(RuntimeError, match=needs):
        normfuse.layer_norm(torch.randn(3, 8), (8,))


def test_interpreter_probe_accepts_the_triton_ci_runs():
    """The Triton tests skip where the probe finds the interpreter unable to run the kernels on CPU
    tensors: on the Triton CI installs (3.9; 3.2 and 3.5.1 with NumPy 2.3 passed too) the probe
    must find it able, or those tests would vanish into a skip."""
    triton = pytest.importorskip("triton")
    from normfuse.backends import triton as triton_backend

    if not triton_backend.interpreting() or torch.cuda.is_available():
        pytest.skip("checks Triton's interpreter on the CPU (TRITON_INTERPRET=1, no GPU)")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}: the probe may rightly refuse it (README)")
    assert triton_backend.interpreter_runs_on_cpu_tensors() and triton_backend.available()


def test_no_kernel_falls_back_to_reference_and_warns_once():
    ops._warned_fallbacks.clear()
    x = torch.empty(2, 3, dtype=torch.float8_e4m3fn)  # a dtype without a kernel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.backend_name(x) == "reference"
        assert ops.backend_name(x) == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "reference" in messages[0]


def test_meta_tensors_take_the_reference_without_a_warning():
    # shapes only (init_empty_weights, FLOP counters): nothing is slower on the reference
    ops._warned_fallbacks.clear()
    x = torch.randn(4, 16, device="meta", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend_name(x) == "reference"
        out = normfuse.LayerNorm(16, device="meta")(x)
        out.sum().backward()
    assert out.shape == x.shape and out.is_meta and x.grad.is_meta


def test_double_backward_goes_through_differentiable_formulas():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    out = normfuse.layer_norm(x, (9,), w)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.sum(), w)
    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_()
    ref_out = torch.nn.functional.layer_norm(xr, (9,), wr)
    (rgx,) = torch.autograd.grad(ref_out.pow(2).sum(), xr, create_graph=True)
    (rggw,) = torch.autograd.grad(rgx.sum(), wr)
    assert torch.allclose(ggw, rggw, atol=1e-10)


# --- torch.func transforms and forward-mode AD -------------------------------------------------
# Each normfuse function under a transform is held to the float64 reference under the same
# transform: the reference is plain torch ops, so torch differentiates and vmaps it itself.

N_FEAT = 6


def _norm(kind: str, lib: str):
    """(x, residual, weight, bias) -> output(s) of one of the four functions, normfuse's or the reference's."""
    rms = kind.endswith("rms")
    eps = 1e-5

    def call(x, r, w, b):
        if lib == "normfuse":
            if kind == "layer":
                return normfuse.layer_norm(x, (N_FEAT,), w, b, eps)
            if kind == "rms":
                return normfuse.rms_norm(x, (N_FEAT,), w, eps)
            if kind == "add_layer":
                return normfuse.add_layer_norm(x, r, (N_FEAT,), w, b, eps)
            return normfuse.add_rms_norm(x, r, (N_FEAT,), w, eps)
        h = x if not kind.startswith("add") else reference.add_residual(x, r)
        out = reference.layer_norm(h, (N_FEAT,), w, None if rms else b, eps, rms=rms)
        return (out, h) if kind.startswith("add") else out

    return call


KINDS_4 = ["layer", "rms", "add_layer", "add_rms"]


def _inputs(device, batch: tuple[int, ...] = (5, 3)):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*batch, N_FEAT, dtype=torch.float64, generator=g).to(device)
    r = torch.randn(*batch, N_FEAT, dtype=torch.float64, generator=g).to(device)
    w = torch.randn(N_FEAT, dtype=torch.float64, generator=g).to(device)
    b = torch.randn(N_FEAT, dtype=torch.float64, generator=g).to(device)
    return x, r, w, b


def _assert_close(got, want, tol=1e-10):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g_, w_ in zip(got, want):
            _assert_close(g_, w_, tol)
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    assert max_rel_err(got, want) < tol


def _scalar(f):
    """A scalar loss of f's output(s), with a nonlinearity so that second derivatives are not trivial."""
    def loss(*args):
        outs = f(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum((o.pow(3) * (i + 1)).sum() for i, o in enumerate(outs))

    return loss


def _ones_like(outs):
    return tuple(torch.ones_like(o) for o in outs) if isinstance(outs, tuple) else torch.ones_like(outs)


TRANSFORMS = {
    "vmap": lambda f, x, r, w, b: torch.func.vmap(f, in_dims=(0, 0, None, None))(x, r, w, b),
    "vmap_dim1": lambda f, x, r, w, b: torch.func.vmap(f, in_dims=(1, 1, None, None))(x, r, w, b),
    "vmap_residual_only": lambda f, x, r, w, b: torch.func.vmap(f, in_dims=(None, 0, None, None))(x[0], r, w, b),
    "grad": lambda f, x, r, w, b: torch.func.grad(_scalar(f), argnums=(0, 1, 2, 3))(x, r, w, b),
    "jvp": lambda f, x, r, w, b: torch.func.jvp(f, (x, r, w, b), (x.cos(), r.sin(), w.cos(), b.sin())),
    "jacrev": lambda f, x, r, w, b: torch.func.jacrev(f, argnums=(0, 2))(x[0], r[0], w, b),
    "jacfwd": lambda f, x, r, w, b: torch.func.jacfwd(f, argnums=(0, 2))(x[0], r[0], w, b),
    "hessian": lambda f, x, r, w, b: torch.func.hessian(_scalar(f))(x[0, 0], r[0, 0], w, b),
    # a vjp's backward runs after its level has exited, under the outer grad that differentiates it
    "grad_of_vjp": lambda f, x, r, w, b: torch.func.grad(
        lambda u: _scalar(lambda *o: torch.func.vjp(lambda v: f(v, r, w, b), u)[1](_ones_like(f(u, r, w, b))))(u))(x),
    "per_sample_grads": lambda f, x, r, w, b: torch.func.vmap(
        torch.func.grad(_scalar(f), argnums=(0, 2, 3)), in_dims=(0, 0, None, None))(x, r, w, b),
    "ensemble": lambda f, x, r, w, b: torch.func.vmap(f, in_dims=(None, None, 0, 0))(
        x, r, torch.stack([w, w.flip(0), 2 * w]), torch.stack([b, -b, b.flip(0)])),
    "ensemble_grads": lambda f, x, r, w, b: torch.func.vmap(
        torch.func.grad(_scalar(f), argnums=(2, 3)), in_dims=(None, None, 0, 0))(
        x, r, torch.stack([w, w.flip(0)]), torch.stack([b, -b])),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind", KINDS_4)
def test_torch_func_transforms_match_the_reference(kind, transform, device):
    x, r, w, b = _inputs(device)
    apply = TRANSFORMS[transform]
    got = apply(_norm(kind, "normfuse"), x, r, w, b)
    want = apply(_norm(kind, "reference"), x, r, w, b)
    _assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS_4)
def test_gradcheck_forward_mode_and_batched_gradients(kind, device):
    # check_batched_grad vmaps the backward of a graph built without any transform (autograd's
    # is_grads_batched); check_forward_ad checks jvp against finite differences
    x, r, w, b = (t.clone().requires_grad_() for t in _inputs(device, (4,)))
    f = _norm(kind, "normfuse")
    inputs = (x, r, w, b) if kind.startswith("add") else (x, w, b)

    def fn(*args):
        return f(*args) if kind.startswith("add") else f(args[0], None, args[1], args[2])

    assert torch.autograd.gradcheck(
        fn, inputs, check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_forward_mode_ad_gives_the_tangent(kind, dtype, device):
    # Regression: the inference fast path and the custom op returned no tangent (None, or
    # zeros under torch.func.jvp) under forward-mode AD: a silently wrong derivative.
    import torch.autograd.forward_ad as fwAD

    x, _, w, b = (t.to(dtype) for t in _inputs(device))
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = _norm(kind, "normfuse")(fwAD.make_dual(x, tangent), None, w, b)
        got = fwAD.unpack_dual(out).tangent
    assert got is not None and got.dtype == dtype and out.dtype == dtype
    want = torch.func.jvp(lambda t: _norm(kind, "reference")(t, None, w, b), (x.double(),), (tangent.double(),))[1]
    assert max_rel_err(got, want) < FWD_TOL[dtype]  # computed in fp32, rounded once to dtype


def test_vmap_folds_into_one_kernel_call(monkeypatch):
    backend = ops.backend_for(torch.empty(1))
    calls = []
    real = backend.norm_fwd
    monkeypatch.setattr(backend, "norm_fwd", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    x, _, w, b = _inputs("cpu", (8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "performance drop" warning of its per-sample fallback
        got = torch.func.vmap(lambda t: normfuse.layer_norm(t, (N_FEAT,), w, b))(x)
    assert calls == [torch.Size([32, N_FEAT])]
    # the same kernel on the same rows: bitwise what the calls one sample at a time give
    assert torch.equal(got, torch.stack([normfuse.layer_norm(t, (N_FEAT,), w, b) for t in x]))
    calls.clear()
    torch.func.vmap(lambda ww: normfuse.layer_norm(x, (N_FEAT,), ww, b))(torch.stack([w, 2 * w, 3 * w]))
    assert len(calls) == 3  # per-sample weights: a call per sample


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vmap_low_precision_with_fp32_weight_is_bitwise_the_unbatched_call(dtype):
    x = torch.randn(4, 3, 64).to(dtype)
    r = torch.randn(4, 3, 64).to(dtype)
    w = torch.randn(64)
    def fn(a, c):
        return normfuse.add_rms_norm(a, c, (64,), w, residual_dtype=torch.float32)

    got_out, got_h = torch.func.vmap(fn)(x, r)
    pairs = [fn(a, c) for a, c in zip(x, r)]
    assert got_out.dtype == dtype and got_h.dtype == torch.float32
    assert torch.equal(got_out, torch.stack([p[0] for p in pairs]))
    assert torch.equal(got_h, torch.stack([p[1] for p in pairs]))


def test_vmap_dropout_follows_torch_randomness_modes():
    x = torch.randn(4, 6, 32)

    def fn(t):
        return normfuse.add_layer_norm(t, None, (32,), dropout_p=0.5)[1]

    # like torch.nn.functional.dropout: random operations refuse vmap's default mode
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(fn)(x)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda t: torch.nn.functional.dropout(t, 0.5))(x)
    same = torch.func.vmap(fn, randomness="same")(x) == 0
    assert all(torch.equal(same[0], s) for s in same[1:])
    different = torch.func.vmap(fn, randomness="different")(x) == 0
    assert not all(torch.equal(different[0], d) for d in different[1:])
    kept = 1 - different.double().mean().item()  # 768 elements at p = 0.5: within 5 sigma
    assert abs(kept - 0.5) < 5 * (0.25 / different.numel()) ** 0.5


def test_modules_under_functional_call_and_stacked_parameters():
    models = [normfuse.LayerNorm(N_FEAT, dtype=torch.float64) for _ in range(3)]
    twins = [torch.nn.LayerNorm(N_FEAT, dtype=torch.float64) for _ in range(3)]
    for i, (m, t) in enumerate(zip(models, twins)):
        with torch.no_grad():
            m.weight.copy_(torch.randn(N_FEAT) + i)
            m.bias.copy_(torch.randn(N_FEAT))
        t.load_state_dict(m.state_dict())
    x = torch.randn(5, N_FEAT, dtype=torch.float64)

    def ensemble(members):
        params, buffers = torch.func.stack_module_state(members)
        base = members[0]
        return torch.func.vmap(lambda p, bf: torch.func.functional_call(base, (p, bf), (x,)))(params, buffers)

    _assert_close(ensemble(models), ensemble(twins))


def test_transforms_in_compiled_code():
    x, r, w, b = (t.float() for t in _inputs("cpu", (4, 3)))
    ln = _norm("layer", "normfuse")
    # forward-mode AD inside torch.compile: the custom op has no formula, so no silent zero
    # tangent: an error with fullgraph, else Dynamo falls back to eager, which has the formula
    _, want = torch.func.jvp(lambda t: reference.layer_norm(t, (N_FEAT,), w, b), (x,), (x.cos(),))

    def jvp(t):
        return torch.func.jvp(lambda u: ln(u, None, w, b), (t,), (t.cos(),))[1]

    torch._dynamo.reset()
    assert max_rel_err(torch.compile(jvp)(x), want) < FWD_TOL[torch.float32]
    torch._dynamo.reset()
    with pytest.raises(Exception) as error:
        torch.compile(jvp, fullgraph=True)(x)
    message = "".join(str(e) for e in (error.value, error.value.__cause__, error.value.__context__))
    skip_where_older_torch_differs("forward-mode AD" not in message, f"stops this otherwise ({message[:200]})")
    assert "forward-mode AD" in message
    # vmap inside compiled code: one call of the custom op's vmap rule; vmap of a compiled function:
    # Dynamo meets the kernel launchers eagerly, and leaves them be (last: torch 2.5's Dynamo fails
    # an internal assert in both)
    want = torch.func.vmap(lambda t: reference.layer_norm(t, (N_FEAT,), w, b))(x)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no per-sample fallback: the custom op's vmap rule
            got = torch.compile(lambda t: torch.func.vmap(lambda u: ln(u, None, w, b))(t), fullgraph=True)(x)
        assert max_rel_err(got, want) < FWD_TOL[torch.float32]
        torch._dynamo.reset()
        got = torch.func.vmap(torch.compile(lambda u: ln(u, None, w, b)))(x)
    except torch._dynamo.exc.TorchDynamoException as failure:
        skip_where_older_torch_differs(True, f"fails compiling vmap over a custom op ({str(failure)[:300]})")
        raise
    assert max_rel_err(got, want) < FWD_TOL[torch.float32]
