"""HALO's layer on CUDA (torch._scaled_mm / torch._int_mm, the Triton Walsh-Hadamard transform) against fp32.

Skipped without a CUDA device. bf16 activations and weights at a LLaMA-7B shape with 2048 tokens; the
relative error of each of the three products stays within what the 8-bit casts cost on CPU
(tests/test_halo.py), so a wrong scale layout, transpose or rotation on the GPU path fails.
"""

import pytest
import torch

from qft.nn import HaloSettings
from qft.nn.halo import halo_matmul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOLERANCE = {"fp8": 0.06, "int8": 0.03}


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_halo_products_on_cuda(level, precision, granularity):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 4096, device="cuda", generator=gen)
    w = torch.randn(11008, 4096, device="cuda", generator=gen) * 0.02
    dy = torch.randn(2048, 11008, device="cuda", generator=gen)
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    y = halo_matmul(xb, wb, HaloSettings(level, precision, granularity))
    y.backward(dy.bfloat16())
    assert y.dtype == xb.grad.dtype == wb.grad.dtype == torch.bfloat16
    xf, wf = xb.detach().float(), wb.detach().float()
    dyf = dy.bfloat16().float()
    for ours, ref in ((y, xf @ wf.t()), (xb.grad, dyf @ wf), (wb.grad, dyf.t() @ xf)):
        err = float((ours.float() - ref).norm() / ref.norm())
        assert err < TOLERANCE[precision], err
