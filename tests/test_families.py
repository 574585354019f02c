"""The model-family options of rms_norm / add_rms_norm against plain-torch transcriptions of each
family's formula (written from Hugging Face transformers' modeling files; see
docs/model-families.md)."""

from __future__ import annotations

import pytest
import torch

import normfuse
from tests._helpers import FWD_TOL, max_rel_err, norm_err

EPS = 1e-6


def llama(x, w, eps=EPS):
    """LlamaRMSNorm (and Mistral, Qwen2/3, Phi-3, Granite, ...): x-hat cast to the input dtype first."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(input_dtype)


def gemma(x, w, eps=EPS):
    """GemmaRMSNorm: scale 1 + w, in float32, then cast."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def olmo2(x, w, eps=EPS):
    """Olmo2RMSNorm (GPT-OSS, OLMo-2/3): weight multiplied in float32, then cast."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (w * h).to(input_dtype)


def t5(x, w, eps=EPS):
    """T5LayerNorm: variance in float32, x-hat cast to the weight's dtype only if that is half."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        h = h.to(w.dtype)
    return w * h


def _t5_xhat_dtype(w):
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32


# family -> (transcription, normfuse keyword options for given x, w)
FAMILIES = {
    "llama": (llama, lambda x, w: {"xhat_dtype": x.dtype}),
    "gemma": (gemma, lambda x, w: {"weight_offset": 1.0}),
    "olmo2": (olmo2, lambda x, w: {}),
    "t5": (t5, lambda x, w: {"xhat_dtype": _t5_xhat_dtype(w)}),
}
COMBOS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of the (common) dtype, element by element."""
    assert a.dtype == b.dtype
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    return (ia - ib).abs()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("x_dtype,w_dtype", COMBOS)
def test_forward_matches_the_familys_formula(family, x_dtype, w_dtype):
    formula, options = FAMILIES[family]
    x = (torch.randn(64, 256) * 3).to(x_dtype)
    w = (0.2 * torch.randn(256) + (0.0 if family == "gemma" else 1.0)).to(w_dtype)
    want = formula(x, w)
    got = normfuse.rms_norm(x, (256,), w, EPS, **options(x, w))
    assert got.dtype == want.dtype
    # The row sums are taken in another order than torch's and rstd is 1/sqrt(.) rather than
    # torch's rsqrt, so rstd may differ by an ulp or two of float32. In a float32 result that
    # shows as a few ulps; in a bf16/fp16 result only a rounding near a tie can move, by one.
    ulps = _ulps_apart(got, want)
    if got.dtype == torch.float32:
        assert ulps.max() <= 4
    else:
        assert ulps.max() <= 1
        assert (ulps == 0).float().mean() >= 0.97


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_gradients_match_the_familys_formula(family, x_dtype, w_dtype):
    formula, options = FAMILIES[family]
    x = (torch.randn(32, 128) * 2).to(x_dtype).requires_grad_()
    w = (0.2 * torch.randn(128) + (0.0 if family == "gemma" else 1.0)).to(w_dtype).requires_grad_()
    dy = torch.randn(32, 128).to(formula(x, w).dtype)
    want = torch.autograd.grad(formula(x, w), (x, w), dy)
    got = torch.autograd.grad(normfuse.rms_norm(x, (128,), w, EPS, **options(x, w)), (x, w), dy)
    tol = 2e-5 if x_dtype == torch.float32 else 2e-2
    for g, t in zip(got, want):
        assert g.dtype == t.dtype and norm_err(g, t) <= tol


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_residual_add_with_family_options(family):
    """A Llama/Gemma decoder layer's ``hidden = residual + hidden; norm(hidden)``, fused."""
    formula, options = FAMILIES[family]
    x = torch.randn(16, 128).bfloat16()
    r = torch.randn(16, 128).bfloat16()
    w = (0.2 * torch.randn(128) + (0.0 if family == "gemma" else 1.0)).bfloat16()
    out, h = normfuse.add_rms_norm(x, r, (128,), w, EPS, **options(x, w))
    assert torch.equal(h, r + x)
    want = formula(r + x, w)
    assert out.dtype == want.dtype and _ulps_apart(out, want).max() <= 1


def test_options_are_checked():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="xhat_dtype"):
        normfuse.rms_norm(x, (4,), xhat_dtype=torch.int32)
    with pytest.raises(TypeError, match="weight_offset"):
        normfuse.rms_norm(x, (4,), weight_offset="1")


def test_gemma_weight_of_zeros_is_the_identity_scale():
    x = torch.randn(4, 32)
    w = torch.zeros(32)
    assert max_rel_err(normfuse.rms_norm(x, (32,), w, weight_offset=1.0), normfuse.rms_norm(x, (32,))) <= FWD_TOL[
        torch.float32
    ]


def deepseek_v4_unweighted(x, eps=EPS):
    """DeepseekV4UnweightedRMSNorm (GLM-5 Next's too): rstd rounded to the input's dtype, then
    multiplied in it."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 256, 4096])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rstd_rounded_to_the_input_dtype_matches_deepseek_v4(dtype, n, backend):
    x = (torch.randn(64, n) * 3).to(dtype)
    want = deepseek_v4_unweighted(x)
    with normfuse.use_backend(backend):
        got = normfuse.rms_norm(x, (n,), None, EPS, rstd_dtype=x.dtype)
    assert got.dtype == want.dtype
    ulps = _ulps_apart(got, want)
    if dtype == torch.float32:
        assert ulps.max() <= 4  # rstd's last float32 bits, as above
    else:
        # x times a 16-bit rstd is exact in float32, so one rounding gives torch's product; only
        # an rstd whose float32 value lies next to a 16-bit tie could round the other way
        assert ulps.max() <= 1
        assert (ulps == 0).float().mean() >= 0.97
    if dtype != torch.float32:
        # without the option the product is rounded once from the unrounded rstd: another result
        plain = normfuse.rms_norm(x, (n,), None, EPS)
        assert n == 1 or not torch.equal(plain, want)


def test_rstd_rounding_through_the_fused_add_and_the_gradients():
    x = (torch.randn(32, 160) * 2).bfloat16().requires_grad_()
    r = torch.randn(32, 160).bfloat16().requires_grad_()
    out, h = normfuse.add_rms_norm(x, r, (160,), None, EPS, rstd_dtype=torch.bfloat16)
    assert torch.equal(h, x + r)
    assert _ulps_apart(out, deepseek_v4_unweighted(x + r)).max() <= 1
    # gradients: the formula's, with the cast taken as the identity (as autograd does)
    dy = torch.randn(32, 160).bfloat16()
    want = torch.autograd.grad(deepseek_v4_unweighted(x + r), (x, r), dy)
    got = torch.autograd.grad(out, (x, r), dy)
    for g, t in zip(got, want):
        assert g.dtype == t.dtype and norm_err(g, t) <= 2e-2
    x32 = x.detach().float().requires_grad_()
    want32 = torch.autograd.grad(deepseek_v4_unweighted(x32), x32, dy.float())[0]
    got32 = torch.autograd.grad(normfuse.rms_norm(x32, (160,), None, EPS, rstd_dtype=torch.float32), x32, dy.float())[0]
    assert norm_err(got32, want32) <= 2e-5


def test_rstd_rounding_compiles_and_exports_as_the_kernel_computes():
    x = (torch.randn(16, 96) * 3).bfloat16()
    eager = normfuse.rms_norm(x, (96,), None, EPS, rstd_dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: normfuse.rms_norm(t, (96,), None, EPS, rstd_dtype=torch.bfloat16), fullgraph=True)
    assert torch.equal(compiled(x), eager)
    # the torch-ops transcription that ONNX exports take
    from normfuse import ops

    onnx_form = ops.norm_fwd_torch_ops(x, None, (96,), None, None, EPS, True, None, 0.0, False, None, None, torch.bfloat16)
    assert _ulps_apart(onnx_form[0], eager).max() <= 1


def test_rstd_dtype_is_checked():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="rstd_dtype must be None or one of"):
        normfuse.rms_norm(x, (4,), rstd_dtype=torch.int32)
    with pytest.raises(TypeError, match="rstd_dtype must be None or one of"):
        normfuse.add_rms_norm(x, x, (4,), rstd_dtype="bfloat16")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("grad", [False, True])
def test_family_options_take_the_direct_path_with_the_general_path_s_results(x_dtype, w_dtype, grad, monkeypatch):
    """Token-sized eager calls with the family options (a patched Llama norm's ``xhat_dtype``)
    go straight to the kernel, as torch's formula does, with the general path's results bit for
    bit (column-major inputs of the same values take the general path)."""
    from normfuse import ops

    direct_calls = []
    def counted(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            direct_calls.append(result is not None)  # None: the direct call declined
            return result

        return call

    for name in ("cpu_inference_direct", "eager_training_direct", "cpu_add_inference_direct"):
        monkeypatch.setattr(ops, name, counted(getattr(ops, name)))
    x, r = (torch.randn(3, 96) * 2).to(x_dtype), torch.randn(3, 96).to(x_dtype)
    w = (0.2 * torch.randn(96) + 1).to(w_dtype).requires_grad_(grad)
    # (each combination of options is a kernel specialization of its own to compile: three)
    options = [{"xhat_dtype": x_dtype}, {"weight_offset": 1.0}, {"rstd_dtype": x_dtype}]
    for kw in options:
        for add in (False, True):
            runs = []
            for contiguous in (True, False):
                xs, rs = (t if contiguous else t.t().contiguous().t() for t in (x, r))
                xs, rs = xs.detach().requires_grad_(grad), rs.detach().requires_grad_(grad)
                direct_calls.clear()
                if add:
                    outs = normfuse.add_rms_norm(xs, rs, (96,), w, EPS, **kw)
                else:
                    outs = (normfuse.rms_norm(xs, (96,), w, EPS, **kw),)
                assert any(direct_calls) == contiguous
                grads = ()
                if grad:
                    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), (xs, rs, w) if add else (xs, w))
                runs.append((outs, grads))
            (direct, direct_grads), (general, general_grads) = runs
            for a, b in zip((*direct, *direct_grads), (*general, *general_grads)):
                assert a.dtype == b.dtype and torch.equal(a, b), (kw, add)
