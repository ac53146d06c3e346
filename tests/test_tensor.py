import pytest
import torch
from conftest import ALL_FORMATS
from safetensors.torch import load, save

from qft.quant.formats import get_format
from qft.quant.tensor import QuantizedTensor

# The shapes of SmolLM2's projections, and one odd shape.
MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(13, 77), (576, 1536)])
def test_nbytes_is_the_bytes_of_its_tensors(name, shape, rng):
    qt = QuantizedTensor.quantize(torch.randn(shape, generator=rng), name)
    stored = [qt.codes, *qt.tensors.values()]
    assert qt.nbytes == sum(len(t.numpy().tobytes()) for t in stored)
    assert 8 * qt.nbytes == qt.format.storage_bits(*shape)
    layout = qt.format.stored_layout(*shape)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qt.tensors.items()} == layout


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_real_bits_match_nominal_within_one_percent(name, shape):
    fmt = get_format(name)
    real = fmt.storage_bits(*shape) / (shape[0] * shape[1])
    assert abs(real - fmt.nominal_bits(*shape)) / fmt.nominal_bits(*shape) < 0.01


def test_two_bit_matrix_takes_a_quarter_byte_per_weight():
    qt = QuantizedTensor.quantize(torch.randn(1536, 576), "nf2-b64-dq8b256")
    assert qt.codes.numel() * 4 == 1536 * 576 // 4  # int32 words: a quarter byte per weight
    assert 2.12 < qt.bits_per_param < 2.13  # 2 + 8/64 + 32/(64*256)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_safetensors_round_trip(name, rng):
    w = torch.randn(10, 45, generator=rng)
    qt = QuantizedTensor.quantize(w, name)
    back = QuantizedTensor.from_tensors(load(save(qt.to_tensors())))
    assert back.format == qt.format and back.shape == qt.shape
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_from_tensors_rejects_bad_input():
    tensors = QuantizedTensor.quantize(torch.randn(8, 64), "nf4-b64-dq8b256").to_tensors()
    with pytest.raises(ValueError, match="missing"):
        QuantizedTensor.from_tensors({k: v for k, v in tensors.items() if k != "codes"})
    with pytest.raises(ValueError, match="codes of a 8x64"):
        QuantizedTensor.from_tensors({**tensors, "codes": tensors["codes"][:4]})
    with pytest.raises(ValueError, match="stores"):
        QuantizedTensor.from_tensors({k: v for k, v in tensors.items() if k != "scale_max"})
    with pytest.raises(ValueError, match="scale_max of a 8x64"):
        QuantizedTensor.from_tensors({**tensors, "scale_max": tensors["scale_max"].half()})
    row = QuantizedTensor.quantize(torch.randn(8, 64), "fp8-e4m3-row").to_tensors()
    with pytest.raises(ValueError, match=r"must be torch.float32 \(8, 1\)"):
        QuantizedTensor.from_tensors({**row, "scale": row["scale"].reshape(1, 8)})
    with pytest.raises(ValueError, match="unknown format"):
        QuantizedTensor.from_tensors({**tensors, "format": torch.tensor(list(b"gptq"), dtype=torch.uint8)})


def test_dequantize_dtype(rng):
    qt = QuantizedTensor.quantize(torch.randn(4, 64, generator=rng), "int4-g32")
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("n", [2, 3])
def test_fsdp_shards_hold_1_over_n_and_gather_back_exactly(name, n, rng):
    """What FSDP2 does (chunk rows, all-gather every rank's pieces, rebuild) without processes: each
    shard holds ceil(1/n) of every inner tensor, and the rebuilt weight is the original, bit for bit."""
    q = QuantizedTensor.quantize(torch.randn(48, 160, generator=rng), name)
    shards = torch.chunk(q, n, dim=0)  # FSDP2 calls this on the parameter
    assert len(shards) == n and all(s.shape == (48 // n, 160) for s in shards)
    for key, t in q.inner_tensors().items():
        assert all(s.inner_tensors()[key].numel() == -(-t.numel() // n) for s in shards)
    gathered = [torch.cat([s.inner_tensors()[k] for s in shards]) for k in q.inner_tensors()]
    _, meta = shards[1].fsdp_pre_all_gather(None, None, None, None, None)
    whole, _ = shards[0].fsdp_post_all_gather(tuple(gathered), meta, torch.float32)
    assert whole.format == q.format and whole.shape == q.shape
    for key, t in q.inner_tensors().items():
        assert torch.equal(whole.inner_tensors()[key], t)
    assert torch.equal(whole.dequantize(), q.dequantize())
    zero = q.new_zeros((48 // n, 160))  # FSDP2's padded shard, filled by copy_
    zero.narrow(0, 0, 48 // n).copy_(shards[1])
    assert all(torch.equal(a, b) for a, b in zip(zero.inner_tensors().values(), shards[1].inner_tensors().values()))


def test_fsdp_shards_refuse_uneven_rows_and_dequantizing(rng):
    q = QuantizedTensor.quantize(torch.randn(50, 64, generator=rng), "int4-g64")
    with pytest.raises(ValueError, match="50 rows"):
        q.shards(4)
    with pytest.raises(RuntimeError, match="FSDP shards"):
        q.shards(2)[0].dequantize()
