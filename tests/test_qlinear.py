import copy

import pytest
import torch
from conftest import ALL_FORMATS
from torch import nn

from qft.nn import QLinear, mark_trainable
from qft.quant.packing import unpack
from qft.quant.tensor import QuantizedTensor


def reference_weight(qt: QuantizedTensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(codebook[code] − zero) · scale written out element by element from the format's own pieces,
    without the kernels' blocked layout."""
    fmt, (rows, cols) = qt.format, tuple(qt.shape)
    codes = unpack(qt.codes, fmt.bits, cols).long()
    decoded, zero = fmt.decode_scales(qt.tensors, rows, cols)
    scale = decoded if scale is None else scale
    block = fmt.block_size(rows, cols)
    column_block = torch.arange(cols) // block
    values = fmt.codebook()[codes]
    if zero is not None:
        values = values - zero[:, column_block]
    return values * scale.expand(rows, -1)[:, column_block]


def _layer(name, rng, rank=4, train_scales=False, bias=True, out=24, inp=70):
    linear = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=rng) * 0.05)
    q = QLinear.from_linear(linear, name, rank=rank, alpha=8, train_scales=train_scales)
    with torch.no_grad():  # a non-zero B so the low-rank term matters
        if rank:
            q.lora_B.copy_(torch.randn(q.lora_B.shape, generator=rng) * 0.1)
    return linear, q


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_forward_matches_reference(name, rng):
    linear, q = _layer(name, rng)
    x = torch.randn(3, 5, 70, generator=rng)
    w = reference_weight(q.weight)
    assert torch.allclose(q.weight.dequantize(), w, rtol=1e-6, atol=1e-7)
    ref = x @ w.t() + linear.bias + (8 / 4) * (x @ q.lora_A.t() @ q.lora_B.t())
    assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-6)


def test_the_weight_is_one_frozen_quantized_parameter(rng):
    _, q = _layer("nf3-b64-dq8b256", rng)
    assert {n for n, p in q.named_parameters()} == {"weight", "lora_A", "lora_B"}
    assert isinstance(q.weight, QuantizedTensor) and isinstance(q.weight, nn.Parameter)
    assert not q.weight.requires_grad and q.weight.shape == (24, 70) and q.weight.dtype == torch.float32
    assert mark_trainable(q).keys() == {"lora_A", "lora_B"}
    for name, t in q.state_dict().items():
        assert not t.is_floating_point() or t.numel() < 24 * 70, name  # no dense copy kept
    assert q.weight_codes.dtype == torch.int32 and q.weight.codes is q.weight_codes
    scales = q.weight.scales()
    assert q.weight.scales() is scales  # decoded once, not per call


@pytest.mark.parametrize("name", ["nf4-b64", "nf2-b16", "int4-g32", "int3-ch", "fp8-e4m3-tensor"])
def test_gradients_reach_x_factors_and_scales(name, rng):
    _, q = _layer(name, rng, train_scales=True)
    x = torch.randn(6, 70, generator=rng, requires_grad=True)
    q(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert q.lora_A.grad.abs().sum() > 0 and q.lora_B.grad.abs().sum() > 0
    assert q.scale.grad is not None and q.scale.grad.shape == q.scale.shape

    # the custom backward equals autograd through an explicit dequantization
    scale = q.scale.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = reference_weight(q.weight, scale)
    y = x2 @ w.t() + q.bias + q.scaling * (x2 @ q.lora_A.detach().t() @ q.lora_B.detach().t())
    y.pow(2).sum().backward()
    assert torch.allclose(q.scale.grad, scale.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_codes_and_bias_get_no_gradient(rng):
    _, q = _layer("nf4", rng)
    x = torch.randn(2, 70, generator=rng)
    q(x).sum().backward()
    assert all(not b.requires_grad for b in q.buffers())
    before = q.weight_codes.clone()
    torch.optim.SGD(q.parameters(), lr=1.0).step()
    assert torch.equal(q.weight_codes, before)


def test_trained_scales_change_the_output(rng):
    _, q = _layer("int4-g32", rng, rank=0, train_scales=True)
    x = torch.randn(2, 70, generator=rng)
    before = q(x).detach()
    with torch.no_grad():
        q.scale.mul_(2)
    assert torch.allclose(q(x), 2 * (before - q.bias) + q.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, train_scales", [("nf3-b32-dq8b256", False), ("nf3-b32", True), ("int4-g128", False),
                                                ("int4-g128", True), ("fp8-e5m2-row", True)])
def test_state_dict_round_trip(name, train_scales, rng):
    _, q = _layer(name, rng, train_scales=train_scales)
    if train_scales:
        with torch.no_grad():
            q.scale.mul_(1.5)
    x = torch.randn(4, 70, generator=rng)
    state = q.state_dict()
    assert "codebook" not in state  # derived from the format, not stored

    rebuilt = QLinear.from_state_dict(state)
    assert torch.equal(rebuilt(x), q(x))

    fresh = QLinear(QuantizedTensor.quantize(torch.randn(24, 70), name), torch.zeros(24), rank=4,
                    alpha=8, train_scales=train_scales)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), q(x))


def test_nested_state_dict_prefix(rng):
    _, q = _layer("nf4", rng)
    model = nn.Sequential(nn.Identity(), q)
    rebuilt = QLinear.from_state_dict(model.state_dict(), prefix="1.")
    x = torch.randn(3, 70, generator=rng)
    assert torch.equal(rebuilt(x), q(x))


def test_default_init_starts_as_the_quantized_layer(rng):
    linear = nn.Linear(70, 24)
    q = QLinear.from_linear(linear, "nf4", rank=8, seed=3)
    x = torch.randn(2, 70, generator=rng)
    assert torch.equal(q(x), x @ q.weight.dequantize().t() + linear.bias.detach())
    again = QLinear.from_linear(linear, "nf4", rank=8, seed=3)
    assert torch.equal(again.lora_A, q.lora_A)


def test_bf16_activations(rng):
    _, q = _layer("nf4", rng)
    x = torch.randn(3, 70, generator=rng)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    rel = (y.float() - q(x)).norm() / q(x).norm()
    assert rel < 1e-2


def test_bad_arguments(rng):
    qt = QuantizedTensor.quantize(torch.randn(24, 70, generator=rng), "nf4")
    with pytest.raises(ValueError, match="low-rank factors must be"):
        QLinear(qt, rank=4, lora_a=torch.zeros(4, 69), lora_b=torch.zeros(24, 4))
    with pytest.raises(ValueError, match="rank must be"):
        QLinear(qt, rank=-1)
    with pytest.raises(ValueError, match="bias must have shape"):
        QLinear(qt, torch.zeros(23))
    with pytest.raises(ValueError, match="last dimension 70"):
        QLinear(qt)(torch.randn(2, 71))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        QLinear(qt, backend="cuda-magic")(torch.randn(2, 70))


@pytest.mark.parametrize("name", ["nf4-b64-dq8b256", "int4-g32", "fp8-e5m2-row"])
def test_dtype_cast_keeps_the_quantized_weight(name, rng):
    _, q = _layer(name, rng)
    before = q.weight.dequantize()
    state = {k: v.clone() for k, v in q.state_dict().items() if k.startswith("weight_")}
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.scaling == 2.0
    assert torch.equal(q.weight.dequantize(torch.float32), before)
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype
               for k, v in q.state_dict().items() if k.startswith("weight_"))
    assert q.lora_A.dtype == torch.bfloat16  # trainable parts do follow the cast
    assert q(torch.randn(2, 70, generator=rng).bfloat16()).dtype == torch.bfloat16
    QLinear.from_state_dict(q.state_dict())  # still a valid state


def test_loading_another_format_is_refused(rng):
    _, e4m3 = _layer("fp8-e4m3-row", rng)
    _, e5m2 = _layer("fp8-e5m2-row", rng)
    with pytest.raises(RuntimeError, match="fp8-e4m3-row weight, this layer is fp8-e5m2-row"):
        e5m2.load_state_dict(e4m3.state_dict())


@pytest.mark.parametrize("name", ["nf4-b64", "int4-g32", "fp8-e4m3-row"])
def test_trained_scales_are_the_weights_only_scales(name, rng, tmp_path):
    """One set of scales: what trains is what dequantize(), the state dict and a reload see."""
    _, q = _layer(name, rng, train_scales=True)
    assert q.weight.scale is q.scale and q.scale.dtype == torch.float32
    x = torch.randn(5, 70, generator=rng)
    q(x).pow(2).sum().backward()
    torch.optim.SGD([q.scale], lr=0.5).step()
    trained = q.weight.dequantize()
    assert torch.allclose(trained, reference_weight(q.weight, q.scale.detach()), rtol=1e-6, atol=1e-7)
    assert torch.equal(q.state_dict()["weight_scale"], q.scale.detach())
    assert q.weight.nbytes == q.weight.codes.numel() * 4 + sum(t.numel() * t.element_size()
                                                               for t in q.weight.tensors.values())
    for other in (QLinear.from_state_dict(q.state_dict()), copy.deepcopy(q)):
        assert torch.equal(other.weight.dequantize(), trained) and torch.equal(other(x), q(x))
        other(x).sum().backward()
        assert other.scale.grad is not None  # the copy trains its own scale
    q.to(torch.bfloat16)
    assert q.weight.scale is q.scale and q.scale.dtype == torch.bfloat16


def test_double_quantized_scales_are_not_silently_replaced(rng):
    qt = QuantizedTensor.quantize(torch.randn(24, 70, generator=rng), "nf3-b64-dq8b256")
    with pytest.raises(ValueError, match="train_scales needs scales stored as floats"):
        QLinear(qt, train_scales=True)


def test_lora_init_draws_from_the_stream_it_is_given():
    w = QuantizedTensor.quantize(torch.randn(24, 70), "nf4")
    gen = torch.Generator().manual_seed(0)
    first, second = (QLinear(w, rank=4, generator=gen) for _ in range(2))
    assert not torch.equal(first.lora_A, second.lora_A)  # one stream: layers of one width differ
    again = QLinear(w, rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.lora_A, first.lora_A)


def test_empty_layer_from_spec_on_meta_loads_everything(rng):
    _, q = _layer("int4-g32", rng, train_scales=True)
    q.to(torch.bfloat16)
    with torch.device("meta"):
        empty = QLinear.empty(q.spec())
    assert empty.weight.is_meta
    empty.load_state_dict(q.state_dict(), assign=True)
    assert not empty.weight.is_meta and empty.weight.dtype == torch.bfloat16
    assert {k: v.dtype for k, v in empty.state_dict().items()} == {k: v.dtype for k, v in q.state_dict().items()}
    x = torch.randn(3, 70, generator=rng).bfloat16()
    assert torch.equal(empty(x), q(x))


def test_load_state_dict_copies_into_the_layers_own_tensors(rng):
    _, q = _layer("int4-g32", rng, train_scales=True)
    target = QLinear(QuantizedTensor.quantize(torch.randn(24, 70, generator=rng), "int4-g32"), torch.zeros(24),
                     rank=4, alpha=8, train_scales=True)
    lora_a, scale, codes = target.lora_A, target.scale, target.weight.codes
    target.load_state_dict(q.state_dict())
    assert target.lora_A is lora_a and target.scale is scale and target.weight.codes is codes  # copied in place
    x = torch.randn(3, 70, generator=rng)
    assert torch.equal(target(x), q(x))


def test_load_state_dict_of_the_adapters_alone(rng):
    """strict=False with only lora_A/lora_B loads them (and reports the base's keys as missing)."""
    _, q = _layer("int4-g32", rng)
    with torch.no_grad():
        q.lora_B.normal_(generator=rng)
    target = copy.deepcopy(q)
    with torch.no_grad():
        target.lora_A.zero_()
        target.lora_B.zero_()
    result = target.load_state_dict({"lora_A": q.lora_A, "lora_B": q.lora_B}, strict=False)
    assert torch.equal(target.lora_A, q.lora_A) and torch.equal(target.lora_B, q.lora_B)
    assert "bias" in result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 70, generator=rng)
    assert torch.equal(target(x), q(x))


@pytest.mark.parametrize("name", ["int4-g16", "nf3-b32", "int2-ch"])
def test_scale_gradient_in_chunks_equals_the_dense_reduction(name, rng):
    """Blockwise (a block at a time) equals Σ over each block of dW ⊙ grid with dW = dyᵀx built whole."""
    from qft.kernels.torch_path import _grid, scale_grad

    _, q = _layer(name, rng, rank=0, train_scales=True)
    w = q.weight
    scale, zero = w.scales()
    grid = _grid(w.codes, w.codebook(), zero, w.format.bits, w.cols, w.block)
    x, dy = torch.randn(3, 5, 70, generator=rng), torch.randn(3, 5, 24, generator=rng)
    dw = torch.nn.functional.pad(dy.reshape(-1, 24).t() @ x.reshape(-1, 70), (0, -70 % w.block))
    dense = (dw.view(24, -1, w.block) * grid).sum(-1).sum_to_size(scale.shape)
    for chunk_bytes in (1, 1 << 30):  # one block per step, and all blocks at once
        got = scale_grad(x, dy, grid, q.scale.detach(), 70, w.block, chunk_bytes=chunk_bytes)
        assert torch.allclose(got, dense, rtol=1e-4, atol=1e-5)
