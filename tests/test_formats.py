import math

import pytest
import torch
from conftest import ALL_FORMATS

from qft.quant.formats import FP8, NormalFloat, UniformInt, get_format, nf_codebook
from qft.quant.tensor import QuantizedTensor


def test_nf4_codebook_equals_bitsandbytes():
    import bitsandbytes.functional as bnbf

    assert torch.equal(nf_codebook(4), bnbf.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codebook_shape(bits):
    book = nf_codebook(bits)
    assert len(book) == 2**bits
    assert book[0] == -1 and book[-1] == 1 and (book == 0).sum() == 1
    assert torch.all(book[1:] > book[:-1])
    # one more positive than negative level, as in QLoRA
    assert (book > 0).sum() == (book < 0).sum() + 1


def _nearest_grid_distance(qt: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """Distance from each weight to the closest value its block's stored grid can express."""
    scale, zero = qt.scales()
    rows, cols = w.shape
    block = qt.block
    book = qt.codebook()
    book = book[torch.isfinite(book)]
    b = torch.arange(cols) // block
    s = scale.expand(rows, -1)[:, b] if scale.shape[1] > 1 else scale.expand(rows, 1)
    z = 0 if zero is None else zero.expand(rows, -1)[:, b]
    grid = (book.view(1, 1, -1) - (z.unsqueeze(-1) if zero is not None else 0)) * s.unsqueeze(-1)
    return (grid - w.unsqueeze(-1)).abs().amin(-1)


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(7, 33), (20, 100), (3, 257)])
def test_rounds_to_nearest_stored_grid(name, shape, rng):
    w = torch.randn(shape, generator=rng) * 0.02
    w[0, 0] = 0.3  # an outlier
    qt = QuantizedTensor.quantize(w, name)
    err = (qt.dequantize() - w).abs()
    nearest = _nearest_grid_distance(qt, w)
    # round to nearest: no code of the stored grid would have been closer
    assert torch.all(err <= nearest + 1e-6 * w.abs().max())


@pytest.mark.parametrize("name", [n for n in ALL_FORMATS if not n.startswith("fp8") and "-dq" not in n])
def test_error_within_half_a_step(name, rng):
    """Without double quantization nothing clips: error <= half the largest grid step x scale."""
    w = torch.randn(16, 90, generator=rng)
    qt = QuantizedTensor.quantize(w, name)
    scale, _ = qt.scales()
    book = qt.codebook()
    half_step = (book[1:] - book[:-1]).max() / 2
    b = torch.arange(90) // qt.block
    bound = half_step * scale.expand(16, -1)[:, b]
    assert torch.all((qt.dequantize() - w).abs() <= bound * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("kind,mantissa", [("e4m3", 3), ("e5m2", 2)])
def test_fp8_relative_rounding_bound(kind, mantissa, rng):
    w = torch.randn(12, 40, generator=rng)
    qt = QuantizedTensor.quantize(w, f"fp8-{kind}-row")
    scale, _ = qt.scales()
    tiny = torch.finfo(FP8(kind).dtype).smallest_normal
    bound = torch.maximum(w.abs() * 2.0 ** -(mantissa + 1), scale * tiny * 2.0 ** -(mantissa + 1))
    assert torch.all((qt.dequantize() - w).abs() <= bound * (1 + 1e-5))


def test_double_quantized_scales_track_fp32_scales(rng):
    # 4 runs of 256 scales with different maxima; no scale below m/512, where the code would clamp to m/256
    w = torch.randn(64, 1024, generator=rng) * (0.5 + 0.5 * torch.rand(64, 1, generator=rng))
    fine = QuantizedTensor.quantize(w, "nf4-b64").scales()[0]
    coarse = QuantizedTensor.quantize(w, "nf4-b64-dq8b256").scales()[0]
    # 8-bit codes in [m/256, m] for m the max of each run of 256 scales: within half a level of m
    m = fine.reshape(-1, 256).amax(dim=1, keepdim=True).expand(-1, 256).reshape(fine.shape)
    assert torch.all((coarse - fine).abs() <= m / 512 + 1e-6 * m)  # + fp32 rounding
    assert torch.all(coarse > 0)


def test_int_zero_point_and_constant_groups():
    w = torch.zeros(2, 32)
    w[1] = 0.5  # a constant, all-positive row
    qt = QuantizedTensor.quantize(w, "int4-g16")
    assert torch.allclose(qt.dequantize(), w, atol=0.5 / 15 / 2 + 1e-4)
    assert torch.equal(qt.dequantize()[0], torch.zeros(32))  # zero is exact


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_name_round_trip(name):
    fmt = get_format(name)
    assert get_format(fmt.name) == fmt
    assert get_format(fmt) is fmt


def test_aliases():
    assert get_format("nf4") == NormalFloat(4, 64)
    assert get_format("int4") == UniformInt(4, 128)
    assert get_format("fp8") == FP8("e4m3", "row")


@pytest.mark.parametrize(
    "name,match",
    [
        ("nf5", "NormalFloat bit width"),
        ("nf4-b128", "NormalFloat block size"),
        ("nf4-b64-dq5b256", "scale bit width"),
        ("nf4-b64-dq8b128", "scale block size"),
        ("int9", "int bit width"),
        ("int1", "int bit width"),
        ("int4-g100", "group size"),
        ("iq4_nl", "unknown format"),
    ],
)
def test_bad_format_names(name, match):
    with pytest.raises(ValueError, match=match):
        get_format(name)


@pytest.mark.parametrize("name", ["nf4", "int4", "fp8"])
def test_bad_weights(name):
    w = torch.randn(4, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w2 = w.clone()
        w2[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            QuantizedTensor.quantize(w2, name)
    for shape in [(8,), (2, 3, 4)]:
        with pytest.raises(ValueError, match="2-D"):
            QuantizedTensor.quantize(torch.randn(shape), name)
    with pytest.raises(ValueError, match="floating-point"):
        QuantizedTensor.quantize(torch.ones(4, 8, dtype=torch.int32), name)


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_weight_dtype_quantizes_as_its_fp32_values(name, dtype, rng):
    """Formats compute in fp32: a bf16/fp16 weight quantizes as its exact fp32 values, a float64 one
    as its fp32 rounding; nothing is computed (or stored) in the weight's own dtype."""
    w = (torch.randn(9, 70, generator=rng, dtype=torch.float64) * 0.05).to(dtype)
    if dtype == torch.float64:
        assert not torch.equal(w.float().double(), w)  # the rounding to fp32 changes values
    a = QuantizedTensor.quantize(w.float(), name)
    b = QuantizedTensor.quantize(w, name)
    assert torch.equal(a.codes, b.codes)
    for key, (_, stored_dtype) in a.format.stored_layout(9, 70).items():
        assert b.tensors[key].dtype == stored_dtype
        assert torch.equal(a.tensors[key], b.tensors[key])


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_codebook_on_requested_device(name):
    fmt = get_format(name)
    book = fmt.codebook("meta")
    assert book.device.type == "meta" and book.shape == (1 << fmt.bits,) and book.dtype == torch.float32
    assert fmt.codebook().device.type == "cpu"


def test_int_scale_beyond_fp16_is_refused(rng):
    w = torch.randn(8, 64, generator=rng) * 1e7
    groups = w.reshape(8, 2, 32)
    span = float((groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)).max())
    with pytest.raises(ValueError) as e:
        QuantizedTensor.quantize(w, "int4-g32")
    message = str(e.value)
    assert f"spans {span:.6g}" in message  # the largest range found
    assert f"at most {torch.finfo(torch.float16).max * 15:.6g}" in message  # the limit
    assert "rescale the weight" in message and "NF or FP8" in message  # what to do


def test_int_large_but_representable_weight_round_trips(rng):
    w = (torch.rand(8, 64, generator=rng) * 2 - 1) * 1e4
    qt = QuantizedTensor.quantize(w, "int4-g32")
    scale, _ = qt.scales()
    assert torch.isfinite(scale).all()
    step = scale.repeat_interleave(32, dim=1)
    assert torch.all((qt.dequantize() - w).abs() <= step / 2 * (1 + 1e-5))


def test_nominal_bits_formula():
    assert get_format("nf3-b64-dq8b256").nominal_bits(576, 576) == pytest.approx(3.127, abs=1e-3)
    assert get_format("nf4-b64").nominal_bits(576, 576) == 4.5
    assert get_format("int4-g128").nominal_bits(576, 576) == 4 + 20 / 128
    assert math.isclose(get_format("fp8-e4m3-row").nominal_bits(10, 100), 8 + 32 / 100)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_code_equals_bucketize(bits, rng):
    from qft.quant.formats.nf import _rounding_tables, nearest_code, nf_midpoints

    mids = nf_midpoints(bits)
    cells = _rounding_tables(bits, torch.device("cpu"))[2]
    edges = torch.linspace(-1, 1, cells + 1)
    hard = torch.cat([mids, edges, torch.tensor([0.0, -0.0, 1.5, -1.5, 1e30, -1e30])])
    up, down = torch.full_like(hard, 2.0), torch.full_like(hard, -2.0)
    x = torch.cat([
        torch.randn(20000, generator=rng) * 0.5,
        torch.rand(20000, generator=rng) * 3 - 1.5,
        hard, torch.nextafter(hard, up), torch.nextafter(hard, down),
    ])
    assert torch.equal(nearest_code(x, bits).long(), torch.bucketize(x, mids))
    assert torch.equal(nearest_code(x.view(-1, 2), bits).long(), torch.bucketize(x.view(-1, 2), mids))
    strided = x.view(-1, 2).t()  # a transposed weight (GPT-2's Conv1D) reaches it as a strided view
    assert torch.equal(nearest_code(strided, bits).long(), torch.bucketize(strided, mids))


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(7, 33), (20, 256)])
def test_fake_quantize_equals_dequantize_of_quantize(name, shape, rng):
    """The fast path (no packing, scales computed directly) gives exactly the stored weight's values."""
    w = torch.randn(shape, generator=rng) * 0.02
    w[0, 0] = 0.3
    w[1, :16] = 0  # an all-zero block
    fmt = get_format(name)
    assert torch.equal(fmt.fake_quantize(w), QuantizedTensor.quantize(w, fmt).dequantize())
    if isinstance(fmt, NormalFloat):
        from qft.quant.formats.base import to_blocks

        _, tensors = fmt.quantize(w)
        absmax = to_blocks(w, fmt.block).abs().amax(dim=-1)
        assert torch.equal(fmt.stored_scale(absmax), fmt.decode_scales(tensors, *shape)[0])


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_quantize_returns_uint8_codes_of_the_weights_shape(name, rng):
    codes, _ = get_format(name).quantize(torch.randn(5, 40, generator=rng))
    assert codes.dtype == torch.uint8 and codes.shape == (5, 40)
