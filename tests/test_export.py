"""Merged int4 export in the compressed-tensors pack-quantized layout."""

import json

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file

import qft
from qft.export import (
    export_merged,
    group_for,
    load_merged,
    merged_weight,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from qft.nn import QLinear


@pytest.fixture(scope="module")
def model():
    m = tiny_llama()
    qft.quantize_and_prepare(m, bits="nf3-b64", method="loftq", rank=4, progress=False)
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, QLinear):
                layer.lora_B.add_(0.02 * torch.randn_like(layer.lora_B))
    return m


def test_packing_matches_compressed_tensors_bit_layout(rng):
    # compressed-tensors' pack_to_int32 turns these codes into words 0xFCBA9810, 0x0000000D
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7, 5]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xFCBA9810 - 2**32, 0xD]]
    codes = torch.randint(-8, 8, (7, 21), generator=rng).to(torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (7, 3)
    assert torch.equal(unpack_int4(packed, 21), codes)


def test_int4_scales_are_absmax_over_7_5(rng):
    w = torch.randn(4, 256, generator=rng)
    q, scale = quantize_int4(w, 128, torch.float32)
    assert scale.shape == (4, 2)
    assert torch.allclose(scale, w.reshape(4, 2, 128).abs().amax(-1) / 7.5)
    assert q.min() >= -8 and q.max() <= 7
    back = (q.float().reshape(4, 2, 128) * scale[..., None]).reshape(4, 256)
    assert (back - w).abs().max() <= scale.max() / 2 + 1e-6


def test_group_falls_back_to_a_divisor():
    assert group_for(1536, 128) == 128 and group_for(576, 128) == 64 and group_for(96, 128) == 32


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
    assert weights[32]["targets"] == ["re:.*\\.down_proj$"]
    assert all(w["weights"]["num_bits"] == 4 and w["weights"]["symmetric"] for w in weights.values())


def test_export_reads_back_as_the_merged_int4_model(model, tmp_path):
    export_merged(model, tmp_path / "out", dtype=torch.float32)
    dense = load_merged(tmp_path / "out")
    layer = model.model.layers[1].self_attn.o_proj
    q, scale = quantize_int4(merged_weight(layer), 64, torch.float32)
    expected = (q.float().reshape(64, -1, 64) * scale[..., None]).reshape(64, 64)
    assert torch.equal(dense.model.layers[1].self_attn.o_proj.weight, expected)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        a, b = model(ids).logits, dense(ids).logits
    assert (a - b).norm() < 0.2 * a.norm()  # int4 rounding of a random model, not a different model


def test_merged_weight_includes_the_adapter(model):
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(x @ merged_weight(layer).t(), layer(x), atol=1e-5)


def test_export_needs_a_qft_model(tmp_path):
    with pytest.raises(ValueError, match="no QLinear"):
        export_merged(tiny_llama(), tmp_path / "x")
