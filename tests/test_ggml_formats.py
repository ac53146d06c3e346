"""llama.cpp's block formats: what qft dequantizes is bit for bit what ggml (the gguf package) does."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, quants
from torch import nn

from qft.methods.gptq import gptq, output_error
from qft.nn import QLinear
from qft.quant.formats import GGML_TYPES, GGMLFormat, from_ggml, get_format, is_ggml, to_ggml
from qft.quant.packing import unpack
from qft.quant.tensor import QuantizedTensor

NAMES = list(GGML_TYPES)
NOMINAL = {"q8_0": 8.5, "q4_0": 4.5, "q5_0": 5.5, "q6_k": 6.5625, "q3_k": 3.4375,
           "q4_1": 5.0, "q5_1": 6.0, "q2_k": 2.625, "q4_k": 4.5, "q5_k": 5.5}
ASYMMETRIC = ["q4_1", "q5_1", "q2_k", "q4_k", "q5_k"]  # value = d * q + m: an offset per block
FREE_OFFSET = ["q4_1", "q5_1"]  # the offset is an fp16 per block (the K types': -dmin * integer m)


def _gguf_quantizes(name: str) -> bool:
    try:
        quants.quantize(np.zeros((1, 256), np.float32), GGML_TYPES[name])
    except NotImplementedError:
        return False
    return True


GGUF_QUANTIZES = [name for name in NAMES if _gguf_quantizes(name)]  # gguf only dequantizes the K types


def _block(name: str) -> int:
    return GGML_QUANT_SIZES[GGML_TYPES[name]][0]


def _shapes(name: str) -> list[tuple[int, int]]:
    b = _block(name)
    return [(1, b), (3, 2 * b), (5, 512)]


def _weight(shape, rng) -> torch.Tensor:
    """Small normal weights with an outlier of each sign and a block of zeros (a zero scale)."""
    w = torch.randn(shape, generator=rng) * 0.02
    w[0, 0] = 0.3
    w[-1, -1] = -0.25
    if shape[0] > 1:
        w[1, :256] = 0
    return w


def _gguf_quantize(data: np.ndarray, name: str) -> np.ndarray:
    return quants.quantize(data, GGML_TYPES[name])


def test_names_and_bits(rng):
    assert set(NAMES) == set(NOMINAL) and set(ASYMMETRIC) < set(NAMES)
    assert {"q4_1", "q5_1"} <= set(GGUF_QUANTIZES)  # the comparisons with gguf's quantizer run for these
    for name in NAMES:
        fmt = get_format(name.upper())
        assert isinstance(fmt, GGMLFormat) and fmt.name == name and get_format(fmt.name) == fmt
        assert is_ggml(name) and is_ggml(fmt) and is_ggml(f" {name.upper()} ")
        assert fmt.asymmetric == (name in ASYMMETRIC)
        assert fmt.nominal_bits(4, 512) == NOMINAL[name]
        for cols in (256, 512):  # qft's own storage is exactly ggml's size (one super-block a row included)
            qt = QuantizedTensor.quantize(torch.randn(4, cols, generator=rng), fmt)
            assert qt.bits_per_param == NOMINAL[name]
            assert (qt.offset() is not None) == (name in ASYMMETRIC)
        codebook = fmt.codebook()
        assert torch.equal(codebook, torch.arange(2.0 ** fmt.bits) - (0 if name in ASYMMETRIC else 2 ** (fmt.bits - 1)))
    assert not is_ggml("nf4") and not is_ggml(get_format("int4")) and not is_ggml("iq4_nl")


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_matches_gguf_bit_for_bit(name, rng):
    for shape in _shapes(name):
        w = _weight(shape, rng)
        qt = QuantizedTensor.quantize(w, name)
        data, qtype = to_ggml(qt)
        block, type_size = GGML_QUANT_SIZES[qtype]
        assert qtype == GGML_TYPES[name]
        assert data.dtype == np.uint8 and data.shape == (shape[0], shape[1] // block * type_size)
        ours = qt.dequantize()
        assert np.array_equal(quants.dequantize(data, qtype), ours.numpy())
        if name in ASYMMETRIC:  # and the offset is what makes it so: without it the values differ
            assert qt.offset().abs().max() > 0
        assert torch.equal(qt.format.fake_quantize(w), ours)
        back = from_ggml(data, qtype, shape)
        assert torch.equal(back.codes, qt.codes)
        assert back.tensors.keys() == qt.tensors.keys()
        assert all(torch.equal(back.tensors[k], t) and back.tensors[k].dtype == t.dtype for k, t in qt.tensors.items())
        assert torch.equal(back.dequantize(), ours)


@pytest.mark.parametrize("name", NAMES)
def test_any_ggml_bytes_read_exactly(name, rng):
    """Random bytes are valid blocks of every one of these types (NaN and Inf scales included):
    qft decodes them as gguf does, and writes the same bytes back."""
    qtype = GGML_TYPES[name]
    shape = (3, 512)
    data = torch.randint(0, 256, (3, 512 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]),
                         generator=rng, dtype=torch.uint8).numpy()
    qt = from_ggml(data, qtype, shape)
    with np.errstate(invalid="ignore"):  # gguf computes inf * 0
        reference = quants.dequantize(data, qtype)
    assert np.array_equal(qt.dequantize().numpy(), reference, equal_nan=True)
    assert np.array_equal(to_ggml(qt)[0], data)
    assert from_ggml(data.reshape(-1), qtype.name.lower(), shape).format == qt.format  # flat bytes, a type name


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_reads_what_gguf_quantizes(name, rng):
    w = _weight((5, 512), rng).numpy()
    data = _gguf_quantize(w, name)
    qt = from_ggml(data, GGML_TYPES[name], w.shape)
    assert np.array_equal(qt.dequantize().numpy(), quants.dequantize(data, GGML_TYPES[name]))
    assert np.array_equal(to_ggml(qt)[0], data)


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_rounding_no_worse_than_gguf(name, rng):
    """Same scales (and Q4_1/Q5_1's m) as llama.cpp's reference quantizer; codes then rounded against the
    stored fp16 scale and m, so no weight lands farther from its value than gguf puts it (measured on
    N(0, 1): squared error 1.0000x gguf's for Q4_0/Q5_0, 0.9999x Q4_1, 0.9997x Q5_1)."""
    spread = torch.randn(16, 1024, 4, generator=rng).square().mean(-1).sqrt()  # heavy tails: Student's t, 4 dof
    w = torch.randn(16, 1024, generator=rng) / spread * 0.02
    gguf_bytes = _gguf_quantize(w.numpy(), name)
    ref = from_ggml(gguf_bytes, GGML_TYPES[name], w.shape)
    qt = QuantizedTensor.quantize(w, name)
    assert all(torch.equal(qt.tensors[k], ref.tensors[k]) for k in qt.tensors)  # the scales llama.cpp picks
    ours, theirs = (qt.dequantize() - w).abs(), (ref.dequantize() - w).abs()
    assert torch.all(ours <= theirs + 1e-6 * w.abs().max())
    assert ours.square().sum() <= 1.001 * theirs.square().sum()


# llama.cpp's own reference quantizer (ggml_quantize_chunk without an importance matrix, llama.cpp
# built in benchmarks/out) on 256 x 4096 N(0, 1) weights: mean squared error. gguf's Python package
# only dequantizes the K types, so these numbers stand in for it.
LLAMA_CPP_NORMAL_MSE = {"q2_k": 8.793e-2, "q4_k": 5.100e-3, "q5_k": 1.308e-3}


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_NORMAL_MSE))
def test_k_types_round_no_worse_than_llama_cpp(name, rng):
    """The unweighted least-squares search for each sub-block's scale and min, and rounding on the stored
    grid, err less than llama.cpp's reference (measured on N(0, 1): 0.79x its squared error for Q2_K,
    0.97x Q4_K, 0.93x Q5_K)."""
    w = torch.randn(64, 1024, generator=rng)
    error = float((QuantizedTensor.quantize(w, name).dequantize() - w).square().mean())
    assert error < LLAMA_CPP_NORMAL_MSE[name], error


def test_error_falls_with_bits(rng):
    """Measured on N(0, 1) rows (mean squared): q2_k 7.0e-2, q3_k 2.1e-2, q4_0 7.4e-3, q4_1 6.1e-3, q4_k 4.9e-3,
    q5_0 1.8e-3, q5_1 1.4e-3, q5_k 1.2e-3, q6_k 2.7e-4, q8_0 2.9e-5: per code width, Q_K (a scale and min per
    sub-block) < Q_1 (min and max per block) < Q_0 (symmetric)."""
    w = torch.randn(8, 1024, generator=rng)
    error = {n: float((QuantizedTensor.quantize(w, n).dequantize() - w).square().mean()) for n in NAMES}
    order = sorted(NAMES, key=error.get)
    assert order == ["q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k"], error
    assert error["q2_k"] < 0.08 and error["q3_k"] < 0.03 and error["q6_k"] < 4e-4, error


@pytest.mark.parametrize("name", NAMES)
def test_rounds_to_nearest_on_the_stored_grid(name, rng):
    w = _weight((4, 512), rng)
    qt = QuantizedTensor.quantize(w, name)
    scale, zero = qt.scales()
    assert zero is None
    per_column = scale.repeat_interleave(qt.block, dim=1)
    grid = qt.codebook().view(1, 1, -1) * per_column.unsqueeze(-1)
    if name in ASYMMETRIC:
        grid = grid + qt.offset().repeat_interleave(qt.block, dim=1).unsqueeze(-1)
    nearest = (grid - w.unsqueeze(-1)).abs().amin(-1)
    assert torch.all((qt.dequantize() - w).abs() <= nearest + 1e-6 * w.abs().max())


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match=r"multiple of 32; this weight is 4x48.*'int4-g128'"):
        QuantizedTensor.quantize(torch.randn(4, 48), "q4_0")
    with pytest.raises(ValueError, match=r"multiple of 256; this weight is 2x96.*'q4_0'"):
        QuantizedTensor.quantize(torch.randn(2, 96), "q6_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        from_ggml(np.zeros(110, np.uint8), "Q3_K", (1, 128))
    with pytest.raises(ValueError, match="is 110 bytes, got 109"):
        from_ggml(np.zeros(109, np.uint8), "Q3_K", (1, 256))
    with pytest.raises(ValueError, match="has no qft format"):
        from_ggml(np.zeros(18, np.uint8), "IQ4_NL", (1, 32))
    with pytest.raises(ValueError, match="needs a weight in a ggml format"):
        to_ggml(QuantizedTensor.quantize(torch.randn(2, 64), "nf4"))


def test_fp16_scale_overflow_is_an_error():
    with pytest.raises(ValueError, match="fp16"):
        QuantizedTensor.quantize(torch.full((1, 32), 1e6), "q4_0")


def test_trained_fp32_scales_export_rounded_to_fp16(rng, caplog):
    qt = QuantizedTensor.quantize(torch.randn(2, 64, generator=rng), "q4_0")
    trained = qt.replace(scale=qt.tensors["scale"].float() * (1 + 1e-4))
    with caplog.at_level(logging.WARNING, logger="qft.quant.formats.ggml"):
        data, qtype = to_ggml(trained)
    assert "rounding" in caplog.text
    assert torch.equal(from_ggml(data, qtype, (2, 64)).tensors["scale"], trained.tensors["scale"].half())


def test_gguf_file_round_trip(tmp_path, rng):
    path = tmp_path / "w.gguf"
    writer = GGUFWriter(path, "llama")
    weights = {}
    for name in NAMES:
        qt = QuantizedTensor.quantize(torch.randn(3, 512, generator=rng), name)
        data, qtype = to_ggml(qt)
        writer.add_tensor(f"w.{name}", data, raw_dtype=qtype)
        weights[f"w.{name}"] = qt
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = {t.name: t for t in GGUFReader(path).tensors}
    for key, qt in weights.items():
        t = read[key]
        back = from_ggml(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())))
        assert back.format == qt.format and torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("name", NAMES)
def test_qlinear_forward(name, rng):
    linear = nn.Linear(256, 6)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 256, generator=rng) * 0.05)
    layer = QLinear.from_linear(linear, name)
    x = torch.randn(2, 3, 256, generator=rng)
    w = torch.from_numpy(quants.dequantize(to_ggml(layer.weight)[0], GGML_TYPES[name]))
    assert torch.allclose(layer(x), x @ w.t() + linear.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_gptq_on_a_ggml_format(name, rng):
    """Q4_0, Q5_0 and the symmetric K types store negative scales (d = max / -8): GPTQ must round on them too;
    the asymmetric types round what is left of w once the offset is taken off (measured output error:
    0.42-0.46x RTN's for Q4_1/Q5_1, 0.53-0.59x Q4_K/Q5_K, 0.65-0.75x Q2_K over 20 draws)."""
    w = torch.randn(16, 256, generator=rng)
    rtn = QuantizedTensor.quantize(w, name)
    assert torch.equal(gptq(w, name, torch.eye(256), damp=0.0).codes, rtn.codes)  # H = I: round to nearest
    x = torch.randn(512, 256, generator=rng) @ torch.randn(256, 256, generator=rng)
    h = x.t() @ x / len(x)
    g = gptq(w, name, h)
    assert all(torch.equal(g.tensors[k], rtn.tensors[k]) for k in rtn.tensors)
    assert output_error(w, g.dequantize(), h) < (0.85 if name == "q2_k" else 0.8) * output_error(w, rtn.dequantize(), h)
    data, qtype = to_ggml(g)  # and what GPTQ chose exports as it is
    assert np.array_equal(quants.dequantize(data, qtype), g.dequantize().numpy())


def test_a_strided_weight_quantizes_as_its_contiguous_copy(rng):
    """The K types' scale search sums floats; a transposed view must not change the order of the sums
    (without care, the q6_k codes of a 32 x 512 transposed view differed in 14 of 20 draws)."""
    w = torch.randn(512, 128, generator=rng).t()
    strided, contiguous = QuantizedTensor.quantize(w, "q6_k"), QuantizedTensor.quantize(w.contiguous(), "q6_k")
    assert torch.equal(strided.codes, contiguous.codes)


def test_the_allocation_over_ggml_types_skips_a_type_a_matrix_cannot_hold(rng):
    """SmolLM2's projections are 576 wide: K types (rows of 256) hold only its down projections."""
    from qft.prepare.allocate import allocate, error_table

    weights = {"narrow": torch.randn(64, 576, generator=rng), "wide": torch.randn(64, 512, generator=rng)}
    table = error_table(weights, NAMES, 0, cache_dir=False, progress=False)
    k_types = [i for i, name in enumerate(NAMES) if name.endswith("_k")]
    assert np.isinf(table.errors[0, k_types]).all() and np.isfinite(np.delete(table.errors[0], k_types)).all()
    assert np.isfinite(table.errors[1]).all()
    cheapest = (4.5 * 576 + 2.625 * 512) / 1088  # q4_0 for the narrow one, q2_k for the wide one
    for bits in (cheapest, 4.0, 4.6, 5.3, 6.0, 8.5):
        chosen, _ = allocate(table, bits)
        assert chosen[0].fits(64, 576), (bits, chosen)
        average = sum(f.storage_bits(*w.shape) for f, w in zip(chosen, weights.values())) / (64 * 1088)
        assert average <= bits + 1e-9
    assert [f.name for f in allocate(table, cheapest)[0]] == ["q4_0", "q2_k"]  # the cheapest that fits each
    only_k = error_table(weights, ["q2_k", "q4_k", "q6_k"], 0, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match="no candidate format can hold narrow"):
        allocate(only_k, 5.0)


def test_lqlora_over_ggml_types_end_to_end():
    from transformers import LlamaConfig, LlamaForCausalLM

    import qft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=288, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    qft.quantize_(model, qft.LQLoRAConfig(bits=5.0, rank=2, formats=["q3_k", "q4_0", "q5_0", "q6_k", "q8_0"]),
                  cache_dir=False, progress=False)
    layers = qft.nn.qft_layers(model)
    names = {m.weight.format.name for m in layers.values()}
    assert names <= {"q3_k", "q4_0", "q5_0", "q6_k", "q8_0"} and len(names) > 1
    assert layers["model.layers.0.mlp.down_proj"].weight.format.fits(256, 288)  # 288 = 9 x 32: no K type
    assert model.qft_report.bits <= 5.0


@pytest.mark.parametrize("name", FREE_OFFSET)
def test_encode_offset_sets_the_fp16_m(name, rng):
    """Q4_1 / Q5_1's m is a free fp16 per block: any float32 offset (e.g. a merged QA-LoRA term) is stored
    rounded to it, and decodes, dequantizes and exports as exactly that."""
    rows, cols = 3, 128
    fmt = get_format(name)
    qt = QuantizedTensor.quantize(torch.randn(rows, cols, generator=rng) * 0.02, name)
    offset = torch.randn(rows, cols // 32, generator=rng) * 0.05
    tensors = fmt.encode_offset(qt.tensors, offset, rows, cols)
    assert tensors.keys() == qt.tensors.keys() and tensors["m"].dtype == torch.float16
    assert torch.equal(fmt.decode_offset(tensors, rows, cols), offset.half().float())
    assert not torch.equal(offset.half().float(), offset)  # the rounding is real: fp16 holds 11 significant bits
    assert torch.equal(tensors["scale"], qt.tensors["scale"])  # only m changes
    assert torch.equal(fmt.decode_offset(fmt.encode_offset(qt.tensors, qt.offset(), rows, cols), rows, cols),
                       qt.offset())  # the offset qft decodes goes back unchanged
    moved = qt.replace(m=tensors["m"])
    scale = qt.scales()[0].repeat_interleave(32, dim=1)
    grid = qt.codebook()[unpack(qt.codes, qt.format.bits, cols, torch.int64)]
    expected = grid * scale + offset.half().float().repeat_interleave(32, dim=1)
    assert torch.equal(moved.dequantize(), expected)
    data, qtype = to_ggml(moved)
    assert np.array_equal(quants.dequantize(data, qtype), expected.numpy())
    with pytest.raises(ValueError, match="expected shape"):
        fmt.encode_offset(qt.tensors, offset[:, :-1], rows, cols)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fmt.encode_offset(qt.tensors, torch.full((rows, cols // 32), 1e6), rows, cols)  # beyond fp16


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q2_k", "q4_0", "q6_k"])
def test_encode_offset_is_an_error_where_the_offset_is_not_a_free_float(name, rng):
    fmt = get_format(name)
    qt = QuantizedTensor.quantize(torch.randn(2, 256, generator=rng), name)
    offset = torch.zeros(2, fmt.n_blocks(2, 256))
    match = "not a free float per block" if name in ASYMMETRIC else "has no offset"
    with pytest.raises(ValueError, match=match):
        fmt.encode_offset(qt.tensors, offset, 2, 256)
