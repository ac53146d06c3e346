"""Merged int4 export in the compressed-tensors pack-quantized layout."""

import json
import logging

import pytest
import torch
from helpers import CALIBRATION, Chars, assert_exports_read_back_as, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

import qft
from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationScheme, apply_quantization_config

from qft.exports.merged import (
    export_merged,
    group_for,
    load_merged,
    pack_signed,
    quantize_symmetric,
    unpack_signed,
)
from qft.nn import QLinear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def prepared(model, bits="nf4", **kwargs):
    """``model`` prepared with LoftQ (rank 4), lora_B made non-zero so that the adapters change the export."""
    qft.quantize_and_prepare(model, bits=bits, method="loftq", rank=4, progress=False, **kwargs)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QLinear):
                layer.lora_B.add_(0.02 * torch.randn_like(layer.lora_B))
    return model


def layer_names(*projections):
    return [f"model.layers.{i}.{p}" for i in range(2) for p in projections]


@pytest.fixture(scope="module")
def model():
    return prepared(tiny_llama(), bits="nf3-b64")


@pytest.fixture(scope="module")
def narrow_model():
    """A tiny Llama whose down_proj inputs are 72 wide: 8 divides them, no power of two from 16 up does."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    return prepared(LlamaForCausalLM(config).eval())


def assert_compressed_tensors_reads_what_load_merged_reads(directory, exported):
    """compressed-tensors (through transformers' loader) quantizes exactly the ``exported`` layers and
    decompresses the same weights and logits as load_merged."""
    ours = load_merged(directory)
    theirs = AutoModelForCausalLM.from_pretrained(directory)  # compressed-tensors' quantizer
    assert [n for n, m in theirs.named_modules() if getattr(m, "quantization_scheme", None)] == exported
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits  # the first forward decompresses theirs
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(exported) <= set(linears)
    for name, layer in linears.items():
        assert torch.equal(theirs.get_submodule(name).weight, layer.weight), name


def test_packing_matches_compressed_tensors_bit_layout(rng):
    # compressed-tensors' pack_to_int32 turns these codes into words 0xFCBA9810, 0x0000000D
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7, 5]], dtype=torch.int8)
    assert pack_signed(q, 4).tolist() == [[0xFCBA9810 - 2**32, 0xD]]
    for bits in range(1, 9):
        codes = torch.randint(-(1 << bits - 1), 1 << bits - 1, (7, 45), generator=rng).to(torch.int8)
        packed = pack_signed(codes, bits)
        assert torch.equal(packed, pack_to_int32(codes, bits)), bits
        assert torch.equal(unpack_signed(packed, bits, 45), codes.to(torch.int16)), bits


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_scales_are_absmax_over_half_the_range(bits, rng):  # int4: absmax / 7.5
    w = torch.randn(4, 256, generator=rng)
    q, scale = quantize_symmetric(w, 128, torch.float32, bits)
    top = 2 ** (bits - 1)
    assert scale.shape == (4, 2)
    assert torch.allclose(scale, w.reshape(4, 2, 128).abs().amax(-1) / (top - 0.5))
    assert q.min() >= -top and q.max() <= top - 1 and q.max() > top // 2
    back = (q.float().reshape(4, 2, 128) * scale[..., None]).reshape(4, 256)
    assert (back - w).abs().max() <= scale.max() / 2 + 1e-6


def test_group_falls_back_to_a_divisor_of_at_least_16():
    assert group_for(1536, 128) == 128 and group_for(576, 128) == 64 and group_for(96, 128) == 32
    assert group_for(48, 128) == 16
    assert group_for(72, 128) is None and group_for(8, 128) is None and group_for(100, 64) is None


@pytest.mark.parametrize("group_size", [8, 96, 0])
def test_group_size_must_be_a_power_of_two_of_at_least_16(model, tmp_path, group_size):
    with pytest.raises(ValueError, match="power of two of at least 16"):
        export_merged(model, tmp_path / "out", group_size=group_size)


def test_export_layout_and_config(model, tmp_path):
    export_merged(model, tmp_path / "out", group_size=128)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # 64 x 96: group 32
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tensors[f"{name}.weight_packed"].shape == (64, 12)
    assert tensors[f"{name}.weight_scale"].dtype == torch.bfloat16 and tensors[f"{name}.weight_scale"].shape == (64, 3)
    assert tensors[f"{name}.weight_shape"].tolist() == [64, 96] and tensors[f"{name}.weight_shape"].dtype == torch.int64
    assert f"{name}.weight" not in tensors and not any("lora" in k for k in tensors)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    weights = {g["weights"]["group_size"]: g for g in q["config_groups"].values()}
    assert set(weights) == {64, 32}
    assert weights[32]["targets"] == layer_names("mlp.down_proj")
    assert sorted(weights[64]["targets"]) == sorted(layer_names(*PROJECTIONS[:-1]))
    assert all(w["weights"]["num_bits"] == 4 and w["weights"]["symmetric"] for w in weights.values())
    assert all(w["weights"]["strategy"] == "group" for w in weights.values())


def test_export_reads_back_as_the_merged_int4_model(model, tmp_path):
    export_merged(model, tmp_path / "out", dtype=torch.float32)
    dense = load_merged(tmp_path / "out")
    layer = model.model.layers[1].self_attn.o_proj
    q, scale = quantize_symmetric(layer.merged_weight(), 64, torch.float32)
    expected = (q.float().reshape(64, -1, 64) * scale[..., None]).reshape(64, 64)
    assert torch.equal(dense.model.layers[1].self_attn.o_proj.weight, expected)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        a, b = model(ids).logits, dense(ids).logits
    assert (a - b).norm() < 0.2 * a.norm()  # int4 rounding of a random model, not a different model


def test_a_gptq_export_keeps_the_scales_and_lowers_the_output_error(model, tmp_path):
    from qft.files.data import token_blocks

    export_merged(model, tmp_path / "rtn")
    export_merged(model, tmp_path / "gptq", Chars(), rounding="gptq", calibration=CALIBRATION, progress=False)
    rtn, gptq = load_file(tmp_path / "rtn" / "model.safetensors"), load_file(tmp_path / "gptq" / "model.safetensors")
    assert rtn.keys() == gptq.keys()
    scales = [k for k in rtn if k.endswith("weight_scale")]
    assert scales and all(torch.equal(rtn[k], gptq[k]) for k in scales)
    assert not torch.equal(rtn["model.layers.0.mlp.down_proj.weight_packed"],
                           gptq["model.layers.0.mlp.down_proj.weight_packed"])
    ids = token_blocks(Chars(), CALIBRATION, 64)
    with torch.no_grad():
        target = model(ids).logits
        error = {k: float(((load_merged(tmp_path / k)(ids).logits.float() - target) ** 2).mean()) for k in ("rtn", "gptq")}
    assert error["gptq"] < 0.8 * error["rtn"]
    assert_compressed_tensors_reads_what_load_merged_reads(tmp_path / "gptq", layer_names(*PROJECTIONS))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        export_merged(model, tmp_path / "x", rounding="gptq")


def test_an_asymmetric_export_is_qfts_int4_of_the_merged_weight(model, tmp_path):
    from qft.files.data import token_blocks
    from qft.quant.tensor import QuantizedTensor

    export_merged(model, tmp_path / "sym", dtype=torch.float32)
    export_merged(model, tmp_path / "asym", dtype=torch.float32, symmetric=False)
    export_merged(model, tmp_path / "gptq", Chars(), dtype=torch.float32, symmetric=False, rounding="gptq",
                  act_order=True, calibration=CALIBRATION, progress=False)
    q = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["symmetric"] for g in q["config_groups"].values()} == {False}
    sym, asym, gptq = (load_merged(tmp_path / k) for k in ("sym", "asym", "gptq"))
    weight_error = {"sym": 0.0, "asym": 0.0}
    for name, layer in model.named_modules():
        if isinstance(layer, QLinear):
            w = layer.merged_weight().detach()
            expected = QuantizedTensor.quantize(w, f"int4-g{group_for(w.shape[1], 128)}").dequantize()
            assert torch.equal(asym.get_submodule(name).weight, expected), name
            for key, dense in (("sym", sym), ("asym", asym)):
                weight_error[key] += float(((dense.get_submodule(name).weight - w) ** 2).sum())
    assert weight_error["asym"] < 0.9 * weight_error["sym"]  # a zero-point spends no level outside [min, max]
    ids = token_blocks(Chars(), CALIBRATION, 64)
    with torch.no_grad():
        target = model(ids).logits
        error = {k: float(((m(ids).logits - target) ** 2).mean()) for k, m in (("asym", asym), ("gptq", gptq))}
    assert error["gptq"] < 0.8 * error["asym"]
    with torch.no_grad():  # compressed-tensors decompresses the same model
        assert torch.equal(load_with_compressed_tensors(tmp_path / "gptq")(ids).logits, gptq(ids).logits)


def test_compressed_tensors_loads_the_export(narrow_model, tmp_path):
    export_merged(narrow_model, tmp_path / "out")
    assert_compressed_tensors_reads_what_load_merged_reads(tmp_path / "out", layer_names(*PROJECTIONS))


def test_only_the_quantized_layers_are_targeted_and_the_rest_ignored(tmp_path):
    model = prepared(tiny_llama(), target_modules=["q_proj", "v_proj"])
    export_merged(model, tmp_path / "out")
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    exported = layer_names("self_attn.q_proj", "self_attn.v_proj")
    assert [t for g in q["config_groups"].values() for t in g["targets"]] == exported
    assert q["ignore"] == [n for n in layer_names(*PROJECTIONS) if n not in exported] + ["lm_head"]
    assert_compressed_tensors_reads_what_load_merged_reads(tmp_path / "out", exported)


def test_a_layer_that_no_group_of_16_divides_is_written_per_channel(narrow_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qft.exports.merged"):
        export_merged(narrow_model, tmp_path / "out", dtype=torch.float32)
    down = layer_names("mlp.down_proj")
    assert "per channel" in caplog.text and all(name in caplog.text for name in down)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors[f"{down[0]}.weight_scale"].shape == (64, 1)
    assert tensors[f"{down[0]}.weight_packed"].shape == (64, 9)
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    channel = [g for g in q["config_groups"].values() if g["weights"]["strategy"] == "channel"]
    assert len(channel) == 1 and channel[0]["targets"] == down and channel[0]["weights"]["group_size"] is None
    dense = load_merged(tmp_path / "out")
    layer = narrow_model.model.layers[0].mlp.down_proj
    codes, scale = quantize_symmetric(layer.merged_weight(), 72, torch.float32)
    assert torch.equal(dense.model.layers[0].mlp.down_proj.weight, codes.float() * scale)


def test_the_merged_weight_includes_the_adapter(model):
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(x @ layer.merged_weight().t(), layer(x), atol=1e-5)


def test_export_needs_a_qft_model(tmp_path):
    with pytest.raises(ValueError, match="no qft layer"):
        export_merged(tiny_llama(), tmp_path / "x")


def peqa_trained(bits):
    """A tiny Llama prepared with PEQA, its scales moved off their fp16 start as training moves them."""
    model = qft.quantize_and_prepare(tiny_llama(), bits=bits, method="peqa", progress=False, cache_dir=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QLinear):
                layer.scale.mul_(1 + 0.05 * torch.randn(layer.scale.shape, generator=gen))
    return model


def load_with_compressed_tensors(directory):
    """The export as compressed-tensors itself reads it: a float model, its quantization config applied,
    compressed in memory (random weights, so the packed zero-points get their packed shapes), the
    exported tensors loaded strictly, then decompressed by compressed-tensors, one scheme per module.

    transformers 5.24 cannot do this for every export: its default route builds asymmetric zero-points
    unpacked (vllm-project/llm-compressor#1618) and its ``dequantize=True`` route decompresses every
    layer with the first config group's scheme."""
    config = AutoConfig.from_pretrained(directory)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(config.quantization_config))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
    missing = set(model.state_dict()) - set(load_file(directory / "model.safetensors")) - {"lm_head.weight"}
    assert not missing, missing
    compressor.decompress_model(model)
    model.tie_weights()
    return model.eval()


def assert_export_is_the_trained_model(model, directory):
    """load_merged and compressed-tensors itself both give the trained model's logits, bit for bit."""
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    theirs = load_with_compressed_tensors(directory)
    with torch.no_grad():
        trained, ours, loaded = model(ids).logits, load_merged(directory)(ids).logits, theirs(ids).logits
    assert trained.dtype == ours.dtype == loaded.dtype == torch.float32
    assert torch.equal(ours, trained) and torch.equal(loaded, trained)


@pytest.mark.parametrize("bits", ["int4-ch", "int3-g32", "int4-g64", 3.5])
def test_peqa_export_keeps_codes_zero_points_and_trained_scales(bits, tmp_path):
    model = peqa_trained(bits)
    export_merged(model, tmp_path / "out")
    assert_export_is_the_trained_model(model, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    schemes = {t: g["weights"] for g in groups.values() for t in g["targets"]}
    for name, layer in model.named_modules():
        if isinstance(layer, QLinear):
            assert torch.equal(tensors[f"{name}.weight_packed"], layer.weight.codes)  # the codes, unchanged
            assert schemes[name]["num_bits"] == layer.weight.format.bits and not schemes[name]["symmetric"]
            assert tensors[f"{name}.weight_scale"].dtype == torch.float32
            # compressed-tensors' own compressor writes the same packed codes and zero-points
            zero = unpack_signed(tensors[f"{name}.weight_zero_point"].t().contiguous(), schemes[name]["num_bits"],
                                 layer.out_features).t().to(torch.int8)
            state = {"weight": layer.merged_weight(), "weight_scale": tensors[f"{name}.weight_scale"],
                     "weight_zero_point": zero}
            theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=[name], weights=schemes[name]))
            for key in ("weight_packed", "weight_zero_point"):
                assert torch.equal(theirs[key], tensors[f"{name}.{key}"]), (name, key)


def test_a_group_that_does_not_divide_the_width_is_split_into_equal_ones(tmp_path):
    model = peqa_trained("int4-g64")  # down_proj is 96 wide: groups of 64 and 32 become three of 32
    export_merged(model, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    scale = model.get_submodule(name).scale.detach()
    assert tensors[f"{name}.weight_scale"].shape == (64, 3)
    assert torch.equal(tensors[f"{name}.weight_scale"], scale[:, [0, 0, 1]])
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["group_size"] for g in groups.values()} == {None, 32}  # 64-wide rows: one group each


def test_a_bf16_peqa_export_says_its_scales_are_rounded(tmp_path, caplog):
    model = peqa_trained("int4-ch")
    with caplog.at_level(logging.WARNING, logger="qft.exports.merged"):
        export_merged(model, tmp_path / "out", dtype=torch.bfloat16)
    assert "rounded to torch.bfloat16" in caplog.text
    assert load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_the_dense_export_is_the_merged_model_as_plain_transformers(model, tmp_path):
    qft.export_dense(model, tmp_path / "fp32", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    assert not any(isinstance(m, QLinear) for m in dense.modules())
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.merged_weight())
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    qft.export_dense(model, tmp_path / "bf16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no qft layer"):
        qft.export_dense(tiny_llama(), tmp_path / "x")


def test_a_quantized_tied_head_is_untied_in_every_export(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
    model = prepared(LlamaForCausalLM(config).eval(), skip_modules=[])
    assert isinstance(model.lm_head, QLinear) and model.config.tie_word_embeddings
    embeddings = model.model.embed_tokens.weight.detach().clone()
    qft.export_dense(model, tmp_path / "dense", dtype=torch.float32)
    qft.export_peft(model, tmp_path / "peft", dtype=torch.float32)
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    for folder in ("dense", "peft/base", "merged"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["tie_word_embeddings"] is False, folder
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    merged = load_merged(tmp_path / "merged")
    for reloaded in (dense, base, merged):  # a tied reader loads the dequantized head over the embeddings
        assert torch.equal(reloaded.model.embed_tokens.weight, embeddings)
    assert torch.equal(dense.lm_head.weight, model.lm_head.merged_weight())
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    assert_exports_read_back_as(model, ids, dense, peft, merged)
    export_merged(model, tmp_path / "bf16")  # and compressed-tensors reads the untied head too
    assert_compressed_tensors_reads_what_load_merged_reads(tmp_path / "bf16", layer_names(*PROJECTIONS) + ["lm_head"])
