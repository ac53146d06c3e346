"""GGUF export (llama.cpp): read back by transformers' GGUF loader and by gguf's own reader."""

import importlib.util
import logging
import os

import gguf
import numpy as np
import pytest
import torch
from helpers import small_tokenizer, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

import qft
from qft.exports.gguf import export_gguf, export_gguf_lora, llama_permutation, tokenizer_pre
from qft.exports.merged import dense_model
from qft.files.models import DEFAULT_GGUF, default_model_dir
from qft.nn import QLinear, qft_layers
from qft.quant.tensor import QuantizedTensor

SENTENCES = ["Hello world 123, how are you?", "<|im_start|>user\nWhat is 2+2?<|im_end|>",
             "  leading spaces, tabs\tand unicode: café, 東京", "def f(x):\n    return x ** 2"]


@pytest.fixture(scope="module")
def smol_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)


@pytest.fixture(scope="module")
def smol_reader():
    return gguf.GGUFReader(os.path.join(default_model_dir(), DEFAULT_GGUF))


def tiny_qwen2(vocab_size, tie=True):
    torch.manual_seed(1)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def read_back(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval()


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


LLAMA_CPP = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_name(module: str) -> str:
    """llama.cpp's name for a decoder projection ("model.layers.1.mlp.up_proj" -> "blk.1.ffn_up.weight")."""
    parts = module.split(".")
    return f"blk.{parts[2]}.{LLAMA_CPP[parts[-1]]}.weight"


def hf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF's interleaved q/k rows back to Hugging Face's rotary halves (the inverse of llama.cpp's permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def prepared(model, bits="int4-g32", rank=2):
    """``model`` quantized with QLoRA and non-zero lora_B, so that the adapters change every export."""
    qft.quantize_(model, qft.QLoRAConfig(bits=bits, rank=rank), progress=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in qft_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def small():
    return small_tokenizer()


@pytest.fixture(scope="module")
def ids(small):
    return torch.randint(0, len(small), (2, 16), generator=torch.Generator().manual_seed(0))


# -- plain models ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_export(tmp_path_factory, smol_tokenizer):
    """A tiny Llama with SmolLM2's tokenizer, exported once (f32, named "tiny")."""
    model = tiny_llama(vocab_size=len(smol_tokenizer))
    return export_gguf(model, tmp_path_factory.mktemp("smol") / "tiny.gguf", smol_tokenizer, dtype="f32", name="tiny")


def test_a_llama_in_f32_reads_back_with_its_logits(tmp_path, small, ids):
    model = tiny_llama(vocab_size=len(small))
    path = export_gguf(model, tmp_path / "tiny.gguf", small, dtype="f32")
    back = read_back(path)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert not back.config.tie_word_embeddings and "output.weight" in tensors(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no temporary file left behind


def test_smollm2s_tokenizer_reads_back_encoding_as_the_original(smol_export, smol_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(smol_export.parent, gguf_file=smol_export.name)
    for text in SENTENCES:
        assert tokenizer(text).input_ids == smol_tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": "hi"}]
    template = smol_tokenizer.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user" in template and tokenizer.apply_chat_template(chat, tokenize=False) == template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)


def test_q_and_k_rows_are_permuted_as_llama_cpp_does(tmp_path, small):
    model = tiny_llama(vocab_size=len(small))
    path = export_gguf(model, tmp_path / "tiny.gguf", small, dtype="f32")
    found = tensors(path)
    attn = model.model.layers[1].self_attn
    q, k = found["blk.1.attn_q.weight"].data, found["blk.1.attn_k.weight"].data
    assert not np.array_equal(q, attn.q_proj.weight.detach().numpy())  # the layout did change ...
    np.testing.assert_array_equal(hf_rows(q, 4), attn.q_proj.weight.detach().numpy())  # ... and only by the permutation
    np.testing.assert_array_equal(hf_rows(k, 2), attn.k_proj.weight.detach().numpy())
    np.testing.assert_array_equal(found["blk.1.attn_v.weight"].data, attn.v_proj.weight.detach().numpy())
    perm = llama_permutation(8, 2)  # two heads of 4 rows: halves (0 1 | 2 3) become pairs (0 2 1 3)
    assert perm.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_f16_bf16_and_q8_0_exports_read_back_close(tmp_path, small, ids):
    model = tiny_llama(vocab_size=len(small))
    ours = logits(model, ids)
    for dtype, kind, tol in (("f16", "F16", 0.01), ("bf16", "BF16", 0.05), ("q8_0", "Q8_0", 0.05)):
        path = export_gguf(model, tmp_path / f"{dtype}.gguf", small, dtype=dtype)
        found = tensors(path)
        assert found["token_embd.weight"].tensor_type.name == kind
        assert found["blk.0.ffn_down.weight"].tensor_type.name == kind
        assert found["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay f32
        assert found["output_norm.weight"].tensor_type.name == "F32"
        back = logits(read_back(path), ids)
        error = (back - ours).norm() / ours.norm()
        assert 0 < error < tol, (dtype, error)
    assert fields(tmp_path / "f16.gguf")["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert fields(tmp_path / "q8_0.gguf")["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_metadata_and_tokenizer_keys_are_the_ones_smollm2s_own_gguf_holds(smol_export, smol_tokenizer, smol_reader):
    ours = gguf.GGUFReader(smol_export).fields
    shipped = smol_reader.fields
    wanted = [k for k in shipped if k.startswith(("llama.", "tokenizer.")) or k in
              ("general.architecture", "general.type", "general.name", "general.file_type",
               "general.quantization_version")]
    assert not set(wanted) - set(ours), sorted(set(wanted) - set(ours))
    assert not [k for k in ours if k.startswith("tokenizer.") and k not in shipped]
    for key in [k for k in wanted if k.startswith("tokenizer.")]:  # the same tokenizer: the same values
        assert ours[key].types == shipped[key].types, key
        assert ours[key].contents() == shipped[key].contents(), key
    config, values = tiny_llama().config, {k: f.contents() for k, f in ours.items()}
    assert values["general.architecture"] == "llama" and values["general.type"] == "model"
    assert values["general.name"] == "tiny" and values["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert values["llama.block_count"] == 2 and values["llama.context_length"] == 128
    assert values["llama.embedding_length"] == 64 and values["llama.feed_forward_length"] == 96
    assert values["llama.attention.head_count"] == 4 and values["llama.attention.head_count_kv"] == 2
    assert values["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert values["llama.rope.dimension_count"] == 16 and values["llama.vocab_size"] == len(smol_tokenizer)
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert values["tokenizer.ggml.pre"] == "smollm"


def test_a_tied_head_writes_no_output_tensor(tmp_path, small, ids):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(small), max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    path = export_gguf(model, tmp_path / "tied.gguf", small, dtype="f32")
    assert "output.weight" not in tensors(path) and "token_embd.weight" in tensors(path)
    back = read_back(path)
    assert back.config.tie_word_embeddings
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_a_vocabulary_smaller_than_the_embeddings_is_padded(tmp_path, ids):
    tokenizer = small_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer) + 6)
    path = export_gguf(model, tmp_path / "pad.gguf", tokenizer, dtype="f32")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tokenizer) + 6 and tokens[-1] == f"[PAD{len(tokenizer) + 5}]"
    assert types[-6:] == [int(gguf.TokenType.UNUSED)] * 6
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == int(gguf.TokenType.CONTROL)
    assert types[0] == int(gguf.TokenType.NORMAL)


def test_a_qwen2_model_with_biases_and_a_tied_head_reads_back(tmp_path):
    tokenizer = small_tokenizer()
    model = tiny_qwen2(len(tokenizer))
    path = export_gguf(model, tmp_path / "qwen.gguf", tokenizer, dtype="f32")
    found = tensors(path)
    assert "output.weight" not in found
    attn = model.model.layers[0].self_attn
    np.testing.assert_array_equal(found["blk.0.attn_q.bias"].data, attn.q_proj.bias.detach().numpy())
    np.testing.assert_array_equal(found["blk.0.attn_v.bias"].data, attn.v_proj.bias.detach().numpy())
    np.testing.assert_array_equal(found["blk.1.attn_q.weight"].data,  # Qwen2: no permutation (NeoX rope)
                                  model.model.layers[1].self_attn.q_proj.weight.detach().numpy())
    values = fields(path)
    assert values["general.architecture"] == "qwen2" and values["qwen2.block_count"] == 2
    assert values["tokenizer.ggml.pre"] == "qwen2" and values["tokenizer.ggml.model"] == "gpt2"
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    back = read_back(path)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    read_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the wind in the trees 12345", "<|im_start|>the<|im_end|>", "it's   spaced\n\nout"]:
        assert read_tokenizer(text).input_ids == tokenizer(text).input_ids, text


# -- qft models ------------------------------------------------------------------------------------

def test_a_qft_model_merged_reads_back_with_the_qft_logits(tmp_path, small, ids):
    model = prepared(tiny_llama(vocab_size=len(small)))
    path = export_gguf(model, tmp_path / "merged.gguf", small, dtype="f32", adapters="merged")
    back = read_back(path)
    ours = logits(model, ids)
    torch.testing.assert_close(logits(back, ids), ours, rtol=1e-4, atol=1e-4)
    # the base alone is a different model: the merged file really holds the adapters
    base = export_gguf(model, tmp_path / "base.gguf", small, dtype="f32", adapters="separate")
    assert (logits(read_back(base), ids) - ours).abs().max() > 1e-3
    f16 = export_gguf(model, tmp_path / "merged16.gguf", small, adapters="merged")
    assert (logits(read_back(f16), ids) - ours).norm() < 0.01 * ours.norm()


def test_the_separate_base_is_the_dequantized_weight_and_the_lora_file_completes_it(tmp_path, small, ids):
    model = prepared(tiny_llama(vocab_size=len(small)))
    layers = qft_layers(model)
    first = layers["model.layers.0.mlp.up_proj"]
    first.scaling = 3.5  # one layer scaled unlike the others: its ratio to alpha goes into its B
    base = export_gguf(model, tmp_path / "base.gguf", small, dtype="f32", adapters="separate")
    lora = export_gguf_lora(model, tmp_path / "lora.gguf", base_name="tiny")
    dense_base = dense_model(model, torch.float32, merged=False)
    torch.testing.assert_close(logits(read_back(base), ids), logits(dense_base, ids), rtol=1e-5, atol=1e-5)
    meta = fields(lora)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["general.base_model.0.name"] == "tiny"
    others = [m for m in layers.values() if m is not first]
    assert meta["adapter.lora.alpha"] == pytest.approx(others[0].scaling * others[0].rank)
    alpha = meta["adapter.lora.alpha"]
    base_t, lora_t = tensors(base), tensors(lora)
    assert len(lora_t) == 2 * len(layers)
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for module, layer in layers.items():
        name = gguf_name(module)
        w, a, b = base_t[name], lora_t[f"{name}.lora_a"], lora_t[f"{name}.lora_b"]
        # the shapes llama.cpp's adapter loader checks (ggml ne order)
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0] == layer.rank
        assert a.tensor_type.name == b.tensor_type.name == "F32"
        merged = w.data + alpha / b.shape[0] * (b.data @ a.data)  # what llama.cpp computes, rank = ne[0] of lora_b
        base_rows = w.data
        kind = name.split(".")[2]
        if kind in heads:
            merged, base_rows = hf_rows(merged, heads[kind]), hf_rows(base_rows, heads[kind])
        np.testing.assert_array_equal(base_rows, layer.base_weight().numpy())
        np.testing.assert_allclose(merged, layer.merged_weight().numpy(), rtol=1e-5, atol=1e-6)


def test_lora_in_f16(tmp_path, small):
    model = prepared(tiny_llama(vocab_size=len(small)))
    found = tensors(export_gguf_lora(model, tmp_path / "lora16.gguf", dtype="f16"))
    assert {t.tensor_type.name for t in found.values()} == {"F16"}
    with pytest.raises(ValueError, match="f32"):
        export_gguf_lora(model, tmp_path / "x.gguf", dtype="q8_0")


def test_a_halo_peft_model_exports_its_merged_and_base_weights(tmp_path, small):
    model = qft.quantize_and_prepare(tiny_llama(vocab_size=len(small)), method="halo", peft=True,
                                     level=1, rank=2, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    merged = tensors(export_gguf(model, tmp_path / "m.gguf", small, dtype="f32", adapters="merged"))
    base = tensors(export_gguf(model, tmp_path / "b.gguf", small, dtype="f32"))
    np.testing.assert_array_equal(merged["blk.0.ffn_down.weight"].data, layer.merged_weight().numpy())
    np.testing.assert_array_equal(base["blk.0.ffn_down.weight"].data, layer.base_weight().numpy())
    lora = tensors(export_gguf_lora(model, tmp_path / "l.gguf"))
    np.testing.assert_array_equal(lora["blk.0.ffn_down.weight.lora_b"].data, layer.lora_B.detach().numpy())


# -- refusals and rules ----------------------------------------------------------------------------

def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path, smol_tokenizer):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        export_gguf(model, tmp_path / "gpt2.gguf", smol_tokenizer)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        export_gguf_lora(model, tmp_path / "gpt2-lora.gguf")
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused(tmp_path, smol_tokenizer):
    model = tiny_llama(vocab_size=len(smol_tokenizer))
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model, tmp_path / "x.gguf", smol_tokenizer, dtype="q4_0")
    with pytest.raises(ValueError, match="adapters"):
        export_gguf(model, tmp_path / "x.gguf", smol_tokenizer, adapters="both")
    with pytest.raises(ValueError, match="tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", None)
    with pytest.raises(ValueError, match="low-rank"):
        export_gguf_lora(model, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="embeddings only"):
        export_gguf(tiny_llama(vocab_size=300), tmp_path / "x.gguf", smol_tokenizer)
    assert not list(tmp_path.iterdir())


def test_the_pre_tokenizer_rule(smol_tokenizer, caplog):
    assert tokenizer_pre(smol_tokenizer) == "smollm"
    assert tokenizer_pre(small_tokenizer()) == "qwen2"
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    gpt2 = GPT2Tokenizer(vocab=vocab, merges=[])
    assert tokenizer_pre(gpt2) == "gpt-2"
    from tokenizers import pre_tokenizers

    gpt2.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert tokenizer_pre(gpt2) == "smollm"  # SmolLM's structure: digits one by one, then GPT-2's regex
    gpt2.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with caplog.at_level(logging.WARNING, logger="qft.exports.gguf"):
        assert tokenizer_pre(gpt2) == "default"
    assert "pre=" in caplog.text


def test_an_explicit_pre_is_written(tmp_path, small):
    model = tiny_llama(vocab_size=len(small))
    path = export_gguf(model, tmp_path / "x.gguf", small, pre="llama-bpe")
    assert fields(path)["tokenizer.ggml.pre"] == "llama-bpe"


# -- llama.cpp's own block formats -----------------------------------------------------------------

def ggml_model(hidden: int, vocab_size: int) -> LlamaForCausalLM:
    """A tiny Llama whose every projection's rows are whole ggml blocks (``hidden``: 32 for Q4_0, 256 for K types)."""
    torch.manual_seed(2)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.mark.skipif(importlib.util.find_spec("qft.quant.formats.ggml") is None,
                    reason="qft.quant.formats.ggml (llama.cpp block formats) is not in this checkout")
@pytest.mark.parametrize("bits, hidden, file_type", [("q4_0", 64, "MOSTLY_Q4_0"), ("q6_k", 256, "MOSTLY_Q6_K"),
                                                     ("q3_k", 256, "MOSTLY_Q3_K_M")])
def test_a_model_in_a_llama_cpp_format_exports_its_bytes_unchanged(tmp_path, small, ids, bits, hidden, file_type):
    from qft.quant.formats.ggml import to_ggml

    model = prepared(ggml_model(hidden, len(small)), bits=bits)
    layers = qft_layers(model)
    assert layers and all(isinstance(m, QLinear) and m.weight.format.name == bits for m in layers.values())
    path = export_gguf(model, tmp_path / "q.gguf", small, dtype="f16", adapters="separate")
    found = tensors(path)
    assert fields(path)["general.file_type"] == int(gguf.LlamaFileType[file_type])
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for module, layer in layers.items():
        data, qtype = to_ggml(layer.weight)
        t = found[gguf_name(module)]
        assert t.tensor_type == qtype and qtype.name == bits.upper()
        written = np.asarray(t.data).reshape(layer.out_features, -1)
        proj = module.split(".")[-1]
        np.testing.assert_array_equal(hf_rows(written, heads[proj]) if proj in heads else written,
                                      np.asarray(data).reshape(layer.out_features, -1))
    back = read_back(path)  # transformers dequantizes the blocks (and un-permutes q/k) itself
    for module, layer in layers.items():
        torch.testing.assert_close(back.get_submodule(module).weight.float(), layer.base_weight(), rtol=0, atol=0)
    # merged, the same layers are dense: the adapters are in, rounded once to f32
    merged = export_gguf(model, tmp_path / "m.gguf", small, dtype="f32", adapters="merged")
    assert {found[gguf_name(m)].tensor_type.name for m in layers} == {bits.upper()}
    assert {t.tensor_type.name for t in tensors(merged).values()} == {"F32"}
    torch.testing.assert_close(logits(read_back(merged), ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def calibration_text(seed: int, chars: int = 2200) -> str:
    """Words of the small tokenizer's merges and letters, about one token per character."""
    words = ["the", "in", "we", "tin", "hen", "wet", "nine", "then"]
    g = torch.Generator().manual_seed(seed)
    return " ".join(words[i] for i in torch.randint(0, len(words), (chars // 4,), generator=g))


def test_requantized_rounds_the_merged_weight_once_into_each_layers_own_type(tmp_path, small):
    model = prepared(ggml_model(64, len(small)), bits="q4_0")
    layers = qft_layers(model)
    path = export_gguf(model, tmp_path / "r.gguf", small, dtype="f32", adapters="requantized")
    base = export_gguf(model, tmp_path / "b.gguf", small, dtype="f32")
    assert path.stat().st_size == base.stat().st_size  # one file the base's size, no adapter beside it
    assert {tensors(path)[gguf_name(m)].tensor_type.name for m in layers} == {"Q4_0"}
    back = read_back(path)
    for module, layer in layers.items():
        expected = QuantizedTensor.quantize(layer.merged_weight(), layer.weight.format).dequantize(torch.float32)
        assert torch.equal(back.get_submodule(module).weight.float(), expected)
        assert not torch.equal(expected, layer.base_weight())  # the adapters are in


def test_requantized_with_gptq_is_closer_to_the_trained_model_than_rounding_to_nearest(tmp_path, small):
    model = prepared(ggml_model(64, len(small)), bits="q4_0", rank=4)
    texts = [calibration_text(seed) for seed in range(3)]
    files = {rounding: export_gguf(model, tmp_path / f"{rounding}.gguf", small, dtype="f32", adapters="requantized",
                                   rounding=rounding, calibration=texts, progress=False)
             for rounding in ("rtn", "gptq")}
    ids = small(texts[0], return_tensors="pt").input_ids[:, :256]
    ours = logits(model, ids)
    error = {r: float((logits(read_back(path), ids) - ours).norm()) for r, path in files.items()}
    assert error["gptq"] < error["rtn"], error
    with pytest.raises(ValueError, match="rounding"):
        export_gguf(model, tmp_path / "x.gguf", small, adapters="requantized", rounding="round")
    assert not (tmp_path / "x.gguf").exists()


def test_requantized_refuses_layers_in_no_llama_cpp_type(tmp_path, small):
    model = prepared(tiny_llama(vocab_size=len(small)), bits="nf4")
    with pytest.raises(ValueError, match="requantized.*llama.cpp type.*adapters='merged'"):
        export_gguf(model, tmp_path / "n.gguf", small, adapters="requantized")
    assert not (tmp_path / "n.gguf").exists()


# -- llama.cpp itself, where benchmarks/gguf.sh has built it ---------------------------------------

LLAMA_PERPLEXITY = os.environ.get("QFT_LLAMA_PERPLEXITY") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "out", "llama.cpp", "build", "bin",
    "llama-perplexity")


def llama_cpp_kl(tmp_path, model_file, base_logits, *args) -> float:
    """llama.cpp's mean KL divergence of ``model_file`` (+ ``args``) from the logits saved in ``base_logits``."""
    import re
    import subprocess

    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text(" ".join(SENTENCES * 40))
    command = [LLAMA_PERPLEXITY, "-f", str(text), "-c", "64", "--chunks", "4", "-t", "2", "-m", str(model_file),
               "--kl-divergence-base", str(base_logits), *args]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    if "--kl-divergence" not in args:
        return 0.0
    return float(re.search(r"Mean\s+KLD:\s+(-?[0-9.eE+-]+)", run.stdout + run.stderr).group(1))


@pytest.mark.skipif(not os.access(LLAMA_PERPLEXITY, os.X_OK), reason="llama.cpp is not built (benchmarks/gguf.sh)")
def test_llama_cpp_applies_the_lora_file_as_qft_merges_it(tmp_path, smol_tokenizer):
    model = prepared(ggml_model(64, len(smol_tokenizer)), bits="q4_0", rank=4)
    layers = qft_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.3)
    next(iter(layers.values())).scaling *= 2.5  # folded into its B
    merged = export_gguf(model, tmp_path / "merged.gguf", smol_tokenizer, dtype="f32", adapters="merged")
    lora = export_gguf_lora(model, tmp_path / "lora.gguf")
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.zero_()
    base = export_gguf(model, tmp_path / "base.gguf", smol_tokenizer, dtype="f32", adapters="merged")  # dequant(Q)
    llama_cpp_kl(tmp_path, merged, tmp_path / "merged.logits")  # saves the merged model's logits
    with_lora = llama_cpp_kl(tmp_path, base, tmp_path / "merged.logits", "--kl-divergence", "--lora", str(lora))
    without = llama_cpp_kl(tmp_path, base, tmp_path / "merged.logits", "--kl-divergence")
    assert with_lora < 1e-4 < without, (with_lora, without)
