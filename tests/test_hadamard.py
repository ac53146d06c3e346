"""Walsh–Hadamard transforms (kernels/hadamard.py, kernels/triton_hadamard.py)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from qft.kernels.hadamard import _base, factorisation, hadamard_matrix, hadamard_transform, try_factorisation

SUPPORTED = [n for n in range(1, 16385) if try_factorisation(n)]


def test_smollm2_and_llama_widths_factor_as_the_paper_needs():
    assert factorisation(576) == (36, 16)
    assert factorisation(192) == (12, 16)
    assert factorisation(1536) == (12, 128)
    assert factorisation(4096) == (1, 4096)
    assert factorisation(14336) == (28, 512)  # Llama-3 / Mistral MLP width
    assert {12, 20, 28, 36, 44, 60} <= {factorisation(n)[0] for n in SUPPORTED}


@pytest.mark.parametrize("k", sorted({try_factorisation(n)[0] for n in SUPPORTED}))
def test_every_stored_order_is_a_hadamard_matrix(k):
    h = _base(k)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), k * torch.eye(k, dtype=torch.float64))


def _sylvester_entries(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """H_{2^m}[i, j] = (-1)^popcount(i & j), computed bit by bit (not by the Kronecker recursion)."""
    both = rows[:, None] & cols[None, :]
    parity = torch.zeros_like(both)
    while bool(both.any()):
        parity ^= both & 1
        both >>= 1
    return 1.0 - 2.0 * parity.double()


def test_the_transform_is_the_dense_product_and_orthogonal_at_every_supported_size_up_to_16384():
    gen = torch.Generator().manual_seed(0)
    for n in SUPPORTED:
        k, p = factorisation(n)
        x = torch.randn(3, n, generator=gen, dtype=torch.float64)
        y = hadamard_transform(x.float()).double()
        # the dense (H_K ⊗ H_p) / √n entry by entry, on a sample of its columns
        cols = torch.randint(0, n, (min(n, 48),), generator=gen)
        every = torch.arange(n)
        dense = _base(k)[every // p][:, cols // p] * _sylvester_entries(every % p, cols % p) / math.sqrt(n)
        torch.testing.assert_close(y[:, cols], x @ dense, atol=1e-5, rtol=1e-5, msg=f"n={n}")
        # an isometry whose transpose undoes it: orthogonal
        torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), atol=1e-4, rtol=1e-5)
        back = hadamard_transform(y.float(), transpose=True).double()
        torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5, msg=f"n={n}")


@pytest.mark.parametrize("n", [12, 20, 36, 192, 576, 1536, 2048])
def test_the_dense_matrix_is_orthonormal(n):
    h = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x.float()).double(), x @ h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard_transform(x.float(), transpose=True).double(), x @ h.t(), atol=1e-5, rtol=1e-5)


def test_a_rotation_cancels_inside_a_product():
    x, w = torch.randn(8, 576), torch.randn(192, 576)
    rotated = hadamard_transform(x) @ hadamard_transform(w).t()
    torch.testing.assert_close(rotated, x @ w.t(), atol=1e-4, rtol=1e-4)


def test_bf16_in_bf16_out_computed_in_fp32():
    x = torch.randn(2, 1536)
    y = hadamard_transform(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), hadamard_transform(x.bfloat16().float()), atol=1e-2, rtol=1e-2)


def test_the_transform_is_differentiable():
    x = torch.randn(3, 576, dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 576)
    (hadamard_transform(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, hadamard_transform(g, transpose=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [11008, 52, 9, 0])
def test_an_unsupported_size_names_the_nearest_supported_factorisations(n):
    with pytest.raises(ValueError) as err:
        factorisation(n)
    if n == 11008:
        assert "10752 = 84·128" in str(err.value) and "11264 = 44·256" in str(err.value)
    elif n:
        assert "nearest supported sizes" in str(err.value)
    with pytest.raises(ValueError):
        hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("n", [2, 16, 128, 576, 1536, 4096, 1 << 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernel_matches_the_torch_path(n, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = 2 if n >= 4096 else 5
    x = torch.randn(rows, n, device=device).to(dtype).requires_grad_()
    y = hadamard_transform(x, backend="triton")
    assert y.dtype == dtype
    reference = hadamard_transform(x.detach().cpu(), backend="torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.detach().cpu().float(), reference.float(), atol=tol, rtol=tol)
    g = torch.randn(rows, n, device=device).to(dtype)
    y.backward(g)
    torch.testing.assert_close(x.grad.cpu().float(), hadamard_transform(g.cpu(), transpose=True).float(),
                               atol=tol, rtol=tol)


_COMPILE_FOR_H100 = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qft.kernels import triton_hadamard as th

shared = []
for n in (2, 64, 1024, 8192, 1 << 15):
    for act in ("*fp32", "*bf16"):
        src = ASTSource(fn=th._fwht_kernel, signature={"x_ptr": act, "y_ptr": act, "scale": "fp32", "N": "constexpr",
                        "LOG_N": "constexpr"}, constexprs={"N": n, "LOG_N": n.bit_length() - 1})
        done = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=th.num_warps(n)))
        shared.append(done.metadata.shared)
print(json.dumps(shared))
"""


def test_the_kernel_compiles_for_h100():
    """Every power of two the kernel takes compiles for sm_90 within an H100's shared memory."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(shared) == 10 and max(shared) <= 227 * 1024
