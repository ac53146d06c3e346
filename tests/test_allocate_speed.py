"""The error table's shared-work path against the straightforward cell-by-cell definition."""

import numpy as np
import pytest
import torch

from qft.prepare.allocate import _residual, error_table, nf_grid, pruned_grid
from qft.quant.formats import get_format
from qft.quant.tensor import QuantizedTensor


def _reference(weights, formats, rank, fisher=None, seed=0, row_stride=4):
    """Each cell on its own: quantize, store, dequantize the strided residual."""
    errors = np.zeros((len(weights), len(formats)))
    for i, (name, w) in enumerate(weights.items()):
        f = None if fisher is None else fisher[name]
        residual = _residual(w.float(), rank, f, seed)[::row_stride]
        importance = 1.0 if f is None else f[::row_stride]
        for j, fmt in enumerate(formats):
            diff = residual - QuantizedTensor.quantize(residual, fmt).dequantize()
            errors[i, j] = w.shape[0] / residual.shape[0] * float((importance * diff * diff).sum())
    return errors


@pytest.mark.parametrize("use_fisher", [False, True])
def test_shared_work_table_equals_cell_by_cell(use_fisher, rng):
    # odd widths (padded last blocks), a row count not divisible by the stride, non-NF formats mixed in
    weights = {"a": torch.randn(64, 128, generator=rng), "b": torch.randn(42, 100, generator=rng) * 0.1,
               "c": torch.randn(96, 48, generator=rng)}
    weights["a"][3, :40] = 0  # all-zero blocks
    fisher = {n: torch.rand(w.shape, generator=rng) for n, w in weights.items()} if use_fisher else None
    formats = nf_grid()[::7] + [get_format("int4-g64"), get_format("fp8")]
    table = error_table(weights, formats, 8, fisher=fisher, cache_dir=False, progress=False)
    np.testing.assert_allclose(table.errors, _reference(weights, formats, 8, fisher), rtol=1e-5)


def test_pruned_grid_is_deterministic_and_keeps_the_cheapest(rng):
    weights = {f"m{i}": torch.randn(32, 64, generator=rng) for i in range(4)}
    a = pruned_grid(weights, 4, cache_dir=False, progress=False)
    assert a == pruned_grid(weights, 4, cache_dir=False, progress=False)
    grid = nf_grid()
    cheapest = min(grid, key=lambda f: f.storage_bits(32, 64))
    assert cheapest in a and len(a) < len(grid)
