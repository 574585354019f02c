"""The oracle itself: its explicit backward equals autograd through its forward, and torch's."""

from __future__ import annotations

import pytest
import torch

from normfuse import reference


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("normalized_shape", [(7,), (3, 4)])
def test_explicit_backward_equals_autograd(rms, normalized_shape):
    x = torch.randn(5, *normalized_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(normalized_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(normalized_shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, *normalized_shape, dtype=torch.float64)
    out = reference.layer_norm(x, normalized_shape, w, b, 1e-5, rms)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), dy)
    dx, dw, db = reference.layer_norm_backward(dy, x.detach(), normalized_shape, w.detach(), 1e-5, rms)
    assert torch.allclose(dx, gx, atol=1e-12) and torch.allclose(dw, gw, atol=1e-12)
    if not rms:
        assert torch.allclose(db, gb, atol=1e-12)


def test_forward_equals_torch_in_float64():
    x = torch.randn(6, 3, 8, dtype=torch.float64)
    w, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose(reference.layer_norm(x, (3, 8), w, b), torch.nn.functional.layer_norm(x, (3, 8), w, b), atol=1e-13)


def test_rms_forward_equals_torch_rms_norm():
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    want = torch.nn.functional.rms_norm(x, (8,), w, 1e-6)
    assert torch.allclose(reference.layer_norm(x, (8,), w, None, 1e-6, rms=True), want, atol=1e-13)
