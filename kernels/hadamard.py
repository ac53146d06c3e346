"""Walsh–Hadamard transforms along the last dimension: HALO's rotations.

A Hadamard matrix of order n = K·2ᵐ is built as the Kronecker product H_K ⊗ H_{2ᵐ}, scaled by
1/√n so that H·Hᵀ = I. H_{2ᵐ} (Sylvester) is never formed: the fast transform applies it in m
butterfly stages (Triton on CUDA, any 2ᵐ up to 2¹⁵; torch elsewhere). H_K is a small ±1 matrix
built once by Paley's constructions — type I for a prime q ≡ 3 (mod 4) gives order q + 1
(12, 20, 24, 44, 48, 60, …), type II for a prime q ≡ 1 (mod 4) gives 2(q + 1) (12, 28, 36, 60,
76, …) — and applied as a dense (K × K) product. SmolLM2's widths: 576 = 36·16, 192 = 12·16,
1536 = 12·128 (powers of two need no H_K).

Orders needing a prime-power field or Williamson's constructions (172, for LLaMA-2's 11008 =
172·64) are not built: ``factorisation`` names the nearest sizes that are.

``x @ H`` for x (…, n): ``hadamard_transform(x)``; ``x @ Hᵀ``: ``hadamard_transform(x, transpose=True)``,
so a rotation cancels: (x H)(w H)ᵀ = x wᵀ. Both are differentiable.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

MAX_FWHT = 1 << 15  # the largest power-of-two part the Triton kernel takes
MAX_K = 256  # the largest dense factor searched


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) over GF(q), χ the quadratic character (0 at 0)."""
    squares = torch.zeros(q, dtype=torch.int64)
    squares[torch.arange(1, q) ** 2 % q] = 1
    chi = 2 * squares - 1
    chi[0] = 0
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


@lru_cache(maxsize=None)
def _base(k: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order k (float64), or None when none of the constructions gives one."""
    if k & (k - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < k:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    q = k - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S, S = [[0, 1ᵀ], [−1, Q]] skew-symmetric
        s = torch.zeros(k, k, dtype=torch.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return (torch.eye(k, dtype=torch.int64) + s).double()
    q = k // 2 - 1
    if k % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        one = torch.tensor([[1, 1], [1, -1]])
        other = torch.tensor([[1, -1], [-1, -1]])
        return (torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), other)).double()
    return None


def try_factorisation(n: int) -> tuple[int, int] | None:
    """(K, 2ᵐ) with n = K·2ᵐ, K the smallest order with a construction, 2ᵐ as large as the kernel takes;
    None when there is none (:func:`factorisation` raises instead)."""
    k = n // (n & -n)  # the odd part
    while k <= min(n, MAX_K):
        if n // k <= MAX_FWHT and _base(k) is not None:
            return k, n // k
        k *= 2
    return None


def factorisation(n: int) -> tuple[int, int]:
    """(K, 2ᵐ) with n = K·2ᵐ for which qft builds a Hadamard matrix; a ValueError naming the nearest
    supported sizes when there is none."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    found = try_factorisation(n)
    if found is None:
        below = next(m for m in range(n - 1, 0, -1) if try_factorisation(m))
        above = next(m for m in range(n + 1, 2 * n + 2) if try_factorisation(m))
        near = ", ".join("{} = {}·{}".format(m, *try_factorisation(m)) for m in (below, above))
        raise ValueError(f"no Hadamard matrix of order {n} is built here (qft builds K·2^m for K from Paley's "
                         f"constructions, K ≤ {MAX_K}); the nearest supported sizes are {near}")
    return found


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The dense orthonormal H (n × n) that ``hadamard_transform`` applies: (H_K ⊗ H_{2ᵐ}) / √n."""
    k, p = factorisation(n)
    h = torch.kron(_base(k), _base(p)) / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def _fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform of the last dimension (a power of two), in x's dtype."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


class _TritonFWHT(torch.autograd.Function):
    """The normalised power-of-two transform by the Triton kernel, written in ``dtype`` (Sylvester's H
    is symmetric: its own transpose, so the backward is the same transform)."""

    @staticmethod
    def forward(ctx, x, dtype):
        from qft.kernels import triton_hadamard

        ctx.input_dtype = x.dtype
        return triton_hadamard.fwht(x, dtype)

    @staticmethod
    def backward(ctx, dy):
        from qft.kernels import triton_hadamard

        return triton_hadamard.fwht(dy.contiguous(), ctx.input_dtype), None


def _fwht(x: torch.Tensor, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """Normalised transform along the last dimension (a power of two), computed in float32, in ``dtype``."""
    n = x.shape[-1]
    if backend == "triton":
        return _TritonFWHT.apply(x.reshape(-1, n).contiguous(), dtype).reshape(x.shape)
    return (_fwht_torch(x.float()) / math.sqrt(n)).to(dtype)


def hadamard_transform(x: torch.Tensor, *, transpose: bool = False, backend: str | None = None) -> torch.Tensor:
    """``x @ H`` (``x @ Hᵀ`` with ``transpose``) along x's last dimension, H = ``hadamard_matrix(n)``.

    Computed in float32 and returned in x's dtype. backend: as ``qft.kernels.dispatch.resolve_backend``
    (Triton for CUDA tensors, torch otherwise).
    """
    from qft.kernels.dispatch import resolve_backend

    n = x.shape[-1]
    k, p = factorisation(n)
    y = _fwht(x.reshape(*x.shape[:-1], k, p), resolve_backend(x.device, backend), x.dtype if k == 1 else torch.float32)
    if k > 1:  # (x H)[c, d] = Σ_a H_K[a, c] (x H_p)[a, d]; with Hᵀ, H_K[c, a]
        base = (_base(k) / math.sqrt(k)).to(device=x.device, dtype=torch.float32)
        y = (base if transpose else base.t()) @ y
    return y.reshape(x.shape).to(x.dtype)
