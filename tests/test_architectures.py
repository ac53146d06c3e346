"""Every architecture goes the whole way: quantize, train a step, save, load with identical logits; and
every export reads back as the qft model it came from."""

import json
import logging

import pytest
import torch
from helpers import assert_exports_read_back_as
from peft import PeftModel
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import qft
from qft.nn import QLinear, dense_weight


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64))


def bert():
    return BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, vocab_size=300, max_position_embeddings=64))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                        max_position_embeddings=64))


def gemma3():
    """gemma3_text (Gemma 3 270M's architecture): q/k norms, tied embeddings, sliding-window layers."""
    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                              vocab_size=300, max_position_embeddings=64, sliding_window=8,
                                              layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.parametrize("build, layers", [(gpt2, 8), (bert, 13), (qwen2, 14), (gemma3, 14)])
@pytest.mark.parametrize("method", ["lqlora", "qlora"])
def test_quantize_train_save_load(build, layers, method, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    qft.quantize_and_prepare(model, bits="nf4", method=method, rank=4, progress=False)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == layers
    with torch.no_grad():  # nf4 + (for lqlora) a rank-4 correction: close to the original model
        assert torch.allclose(model(ids).logits, before, atol=0.2)
    qft.train(model, None, torch.randint(0, 300, (4, 16)), steps=1, batch_size=2, block_size=16, lr=1e-2,
              warmup=1, eval_blocks=0, progress=False)
    qft.save_quantized(model, tmp_path / "ckpt")
    loaded = qft.load_quantized(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_gpt2_conv1d_is_quantized_in_its_orientation():
    torch.manual_seed(0)
    model = gpt2().eval()
    conv = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in=64, out=192)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = conv(x)
    qft.quantize_and_prepare(model, bits="nf8", method="qlora", rank=0, progress=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QLinear) and (layer.out_features, layer.in_features) == (192, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=2e-2)


@pytest.mark.parametrize("build", [gpt2, bert, qwen2, gemma3])
def test_every_export_reads_back_as_the_qft_model(build, tmp_path, caplog):
    torch.manual_seed(0)
    model = build().eval()
    qft.quantize_and_prepare(model, bits="nf4", method="lqlora", rank=4, progress=False)
    with torch.no_grad():  # adapters that change the model, so that the exports must carry them
        for layer in model.modules():
            if isinstance(layer, QLinear):
                layer.lora_B.add_(0.02 * torch.randn_like(layer.lora_B))
    qft.export_dense(model, tmp_path / "dense", dtype=torch.float32)
    qft.export_peft(model, tmp_path / "peft", dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="qft.exports.merged"):
        qft.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    assert ("are Conv1D" in caplog.text) == (build is gpt2)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] == (build is gpt2)
    cls = type(model)  # the merged export names it: a reader builds the model's own class, not a guess
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [cls.__name__]
    dense = cls.from_pretrained(tmp_path / "dense")
    peft = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "peft" / "base"), tmp_path / "peft").eval()
    merged = qft.load_merged(tmp_path / "merged")
    assert type(merged) is cls
    # every weight in its layer's own orientation: a transposed square Conv1D (GPT-2's attn.c_proj) fails here
    for name, layer in model.named_modules():
        if isinstance(layer, QLinear):
            w = layer.merged_weight()
            torch.testing.assert_close(dense_weight(dense.get_submodule(name)), w)
            torch.testing.assert_close(dense_weight(peft.get_submodule(f"base_model.model.{name}").base_layer),
                                       layer.base_weight())
            assert (dense_weight(merged.get_submodule(name)) - w).norm() < 0.2 * w.norm(), name  # int4 rounding
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    # a random tiny Gemma's logits move more under the same per-weight int4 error (checked above): its
    # embeddings are scaled by √hidden, and it has twice the norms
    assert_exports_read_back_as(model, ids, dense, peft, merged, rounding=0.3 if build is gemma3 else 0.2)


GEMMA_METHODS = {
    "lqlora-fisher": qft.LQLoRAConfig(bits=3.0, rank=4, fisher=True),
    "loftq": qft.LoftQConfig(rank=4),
    "qlora-gptq": qft.QLoRAConfig(bits="nf4", rank=4, rounding="gptq"),
    "qalora": qft.QALoRAConfig(bits="q4_1", rank=4),
    "peqa": qft.PEQAConfig(bits=4),
    "int21": qft.INT21Config(bits="int2-g32", rank=4),
    "halo": qft.HALOConfig(),
}


@pytest.mark.parametrize("name", list(GEMMA_METHODS))
def test_every_method_prepares_trains_saves_and_exports_gemma3(name, tmp_path):
    from helpers import CALIBRATION, Chars

    torch.manual_seed(0)
    model = gemma3().eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    config = GEMMA_METHODS[name]
    data = {} if isinstance(config, qft.WholeModelConfig) else {"tokenizer": Chars(), "calibration": CALIBRATION}
    qft.quantize_(model, config, progress=False, **data)
    assert len(qft.nn.qft_layers(model)) == 14
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all()
    if name != "int21":  # 2 bits leave a random model little of itself; 3 and more: close
        assert (after - before).norm() < 0.5 * before.norm()
    qft.train(model, None, torch.randint(0, 300, (4, 16)), steps=1, batch_size=2, block_size=16, lr=1e-2,
              warmup=1, eval_blocks=0, progress=False)
    model.eval()
    qft.save_quantized(model, tmp_path / "ckpt")
    loaded = qft.load_quantized(tmp_path / "ckpt").eval()
    with torch.no_grad():
        trained = model(ids).logits
        assert torch.equal(loaded(ids).logits, trained)
    qft.export_dense(model, tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        dense = type(model).from_pretrained(tmp_path / "dense")(ids).logits
    if name == "halo":  # its weights as trained; the HALO model itself multiplies in FP8 behind rotations
        assert (dense - trained).norm() < 0.1 * trained.norm()
    else:
        torch.testing.assert_close(dense, trained, rtol=1e-4, atol=1e-4)
