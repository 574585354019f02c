"""Capturing a model that uses normfuse: torch.jit.trace, ONNX export (both exporters), torch.jit.script."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import normfuse
from normfuse import reference
from tests._helpers import max_rel_err, skip_where_older_torch_differs

N = 48


class _Block(torch.nn.Module):
    """Every op of the family: LayerNorm, RMSNorm (torch's and a family formula), both add+norms."""

    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        self.ln = normfuse.LayerNorm(N)
        self.rms = normfuse.RMSNorm(N, eps=1e-6)
        self.lin = torch.nn.Linear(N, N)
        self.gemma_w = torch.nn.Parameter(torch.randn(N) * 0.2)
        self.dropout_p = dropout_p
        with torch.no_grad():
            for p in (self.ln.weight, self.ln.bias, self.rms.weight):
                p.normal_(1.0, 0.3)

    def forward(self, x, r):
        a = self.ln(x)
        out, h = normfuse.add_layer_norm(
            self.lin(a), r, (N,), self.ln.weight, self.ln.bias, dropout_p=self.dropout_p, training=self.training
        )  # fmt: skip
        b, h2 = normfuse.add_rms_norm(self.lin(out), h, (N,), self.rms.weight, 1e-6, xhat_dtype=x.dtype)
        c = normfuse.rms_norm(b, (N,), self.gemma_w, 1e-6, weight_offset=1.0)
        return self.rms(c) + h2


def _inputs(rows: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 3, N, generator=g) * 2 + 1, torch.randn(rows, 3, N, generator=g)


def _reference_block(block: _Block, x, r):
    """The block's function from the float64 oracle (dropout off)."""
    ln = lambda t, w, b: reference.layer_norm(t, (N,), w, b, 1e-5)  # noqa: E731
    rms = lambda t, w, **kw: reference.layer_norm(t, (N,), w, None, 1e-6, rms=True, **kw)  # noqa: E731
    a = ln(x, block.ln.weight, block.ln.bias).float()
    h = (torch.nn.functional.linear(a, block.lin.weight, block.lin.bias) + r).float()
    out = ln(h, block.ln.weight, block.ln.bias).float()
    h2 = (torch.nn.functional.linear(out, block.lin.weight, block.lin.bias) + h).float()
    b = rms(h2, block.rms.weight, xhat_dtype=x.dtype).float()
    c = rms(b, 1.0 + block.gemma_w.double()).float()
    return rms(c, block.rms.weight).float() + h2


def test_jit_trace_records_normfuse_custom_op_and_reproduces_eager():
    block = _Block().eval()
    x, r = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in torch
        traced = torch.jit.trace(block, (x, r))
    graph = str(traced.inlined_graph)
    assert graph.count("normfuse::norm_fwd") == 5, graph  # the kernels run in the traced module
    expected = block(x, r)
    assert torch.equal(traced(x, r), expected)
    assert max_rel_err(expected, _reference_block(block, x, r)) < 1e-5
    # gradients through the traced module: the custom op's autograd
    xg = x.clone().requires_grad_()
    traced(xg, r).square().sum().backward()
    xe = x.clone().requires_grad_()
    block(xe, r).square().sum().backward()
    assert torch.allclose(xg.grad, xe.grad, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    assert torch.equal(torch.jit.load(buf)(x, r), expected)


def test_jit_script_says_what_to_use_instead():
    model = torch.nn.Sequential(torch.nn.Linear(N, N), torch.nn.LayerNorm(N))
    normfuse.patch(model)
    for module in (normfuse.LayerNorm(N), normfuse.RMSNorm(N), model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.jit.trace"):
                torch.jit.script(module)
    assert type(model[1]).__name__ == "NormfuseLayerNorm"  # scripting's failure left the model as it was


onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install normfuse[test])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install normfuse[test])")


def _export(model, args, dynamo: bool, **kwargs) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript", reason="onnxscript is not installed (the exporter built on torch.export)")
            try:
                torch.onnx.export(model, args, buf, dynamo=True, verbose=False, **kwargs)
            except Exception as error:
                # torch 2.5's exporter does not flag its export while torch.export traces, so the
                # custom op reached it untranslated ("No ONNX function found for normfuse.norm_fwd")
                skip_where_older_torch_differs(True, f"cannot export this with dynamo=True ({str(error)[:200]})")
                raise
        else:
            torch.onnx.export(model, args, buf, dynamo=False, **kwargs)
    return buf.getvalue()


def _run(model_bytes: bytes, *arrays):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), arrays)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _op_types(model_bytes: bytes) -> set[str]:
    graph = onnx.load_from_string(model_bytes).graph
    return {(n.domain, n.op_type) for n in graph.node}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_holds_onnx_ops_and_computes_the_same(dynamo):
    block = _Block().eval()
    x, r = _inputs()
    model_bytes = _export(block, (x, r), dynamo)
    ops = _op_types(model_bytes)
    assert not any("normfuse" in domain or "normfuse" in op for domain, op in ops), ops
    assert ("", "LayerNormalization") in ops, ops  # LayerNorm as ONNX's own op
    (out,) = _run(model_bytes, x, r)
    expected = block(x, r)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert max_rel_err(out, _reference_block(block, x, r)) < 1e-5
    assert max_rel_err(out, expected) < 1e-5


def test_onnx_export_keeps_the_batch_dimension_dynamic():
    # the TorchScript-based exporter bakes Python ints in: no reshape to a row count may be exported
    block = _Block().eval()
    x, r = _inputs(rows=5)
    model_bytes = _export(
        block, (x, r), dynamo=False, input_names=["x", "r"], dynamic_axes={"x": {0: "batch"}, "r": {0: "batch"}}
    )  # fmt: skip
    x7, r7 = _inputs(rows=7)
    (out,) = _run(model_bytes, x7, r7)
    assert out.shape == (7, 3, N)
    assert max_rel_err(out, block(x7, r7)) < 1e-5


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_of_training_dropout_keeps_or_drops_each_element(dynamo):
    p = 0.5

    class AddNorm(torch.nn.Module):
        def forward(self, x, r):
            return normfuse.add_layer_norm(x, r, (N,), dropout_p=p, training=True, return_dropout_mask=True)

    x, r = _inputs(rows=40)
    model_bytes = _export(AddNorm(), (x, r), dynamo)
    out, h, mask = _run(model_bytes, x, r)
    mask = mask.bool()
    # each element of the residual stream is residual + x / (1 - p) where kept, the residual where dropped
    assert torch.allclose(h, torch.where(mask, r + x / (1 - p), r), rtol=1e-6, atol=1e-6)
    assert 0.4 < mask.float().mean().item() < 0.6
    assert max_rel_err(out, reference.layer_norm(h, (N,))) < 1e-5


def test_fx_symbolic_trace_records_normfuse_calls():
    # torch records its own norms as calls; before, tracing ran normfuse's checks on Proxies and
    # failed ("argument 'weight' must be Tensor, not Proxy"), also on any model after patch()
    block = _Block().eval()
    x, r = _inputs()
    graph_module = torch.fx.symbolic_trace(block)
    called = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    normfuse_calls = [f for f in called if getattr(f, "__module__", "") == "normfuse.functional"]
    assert len(normfuse_calls) == 5, called
    assert torch.equal(graph_module(x, r), block(x, r))
    xg, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    graph_module(xg, r).square().sum().backward()
    block(xe, r).square().sum().backward()
    assert torch.equal(xg.grad, xe.grad)

    model = torch.nn.Sequential(torch.nn.Linear(N, N), torch.nn.LayerNorm(N), torch.nn.RMSNorm(N))
    expected = model(x)
    normfuse.patch(model)
    traced = torch.fx.symbolic_trace(model)
    names = [getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"]
    assert names.count("layer_norm") == 1 and names.count("rms_norm") == 1, names
    assert max_rel_err(traced(x), expected) < 1e-5
