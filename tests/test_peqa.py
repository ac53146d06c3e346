import pytest
import torch
from helpers import tiny_llama

import qft
from qft.quant.formats import UniformInt
from qft.nn import QLinear


def _peqa(bits, **kwargs):
    return qft.quantize_and_prepare(tiny_llama(), bits=bits, method="peqa", progress=False, cache_dir=False, **kwargs)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, QLinear)]


def test_only_scales_train_and_codes_and_zero_points_stay():
    model = _peqa("int4-ch")
    layers = _layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scale") for n in trainable)
    assert all(m.rank == 0 and m.weight.scale is m.scale for m in layers)
    codes = [m.weight.codes.clone() for m in layers]
    zeros = [m.weight.zero.clone() for m in layers]
    scales = [m.scale.detach().clone() for m in layers]
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))  # one batch, seen 4 times
    result = qft.train(model, None, batch, batch, steps=4, batch_size=2, block_size=16, lr=1e-2, warmup=1,
                       progress=False)
    assert result.losses[-1] < result.losses[0]
    for m, c, z, s in zip(layers, codes, zeros, scales):
        assert torch.equal(m.weight.codes, c) and torch.equal(m.weight.zero, z)  # frozen
        assert not torch.equal(m.scale, s)  # every scale trained
        assert m.weight.codes.grad is None and not m.weight.zero.requires_grad


def test_budget_allocates_int_formats():
    model = _peqa(3.5)
    report = model.qft_report
    assert report.bits <= 3.5 + 1e-9 and report.rank == 0
    assert all(isinstance(qft.get_format(m.format), UniformInt) for m in report.matrices)
    assert len({m.format for m in report.matrices}) > 1  # mixed precision


def test_an_integer_width_means_per_channel_and_a_float_a_budget():
    assert {m.format for m in _peqa(3).qft_report.matrices} == {"int3-ch"}
    assert _peqa(3.0).qft_report.budget == 3.0


def test_refuses_nf_formats_and_a_rank():
    with pytest.raises(ValueError, match="uniform int-k"):
        _peqa("nf4")
    with pytest.raises(ValueError, match="scales only"):
        _peqa("int4-ch", rank=8)
