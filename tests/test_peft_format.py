"""export_peft: a qft model's factors as a PEFT LoRA adapter plus its dequantized base, read by PEFT itself."""

import json

import pytest
import torch
from helpers import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM

import qft
from qft.nn import QLinear
from qft.exports.peft import export_peft
from qft.nn.targets import set_module


def _trained(bits="nf4", **kwargs):
    model = qft.quantize_and_prepare(tiny_llama(), bits=bits, method="loftq", rank=4, progress=False,
                                     cache_dir=False, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _peft_logits(directory, ids):
    base = AutoModelForCausalLM.from_pretrained(directory / "base")
    with torch.no_grad():
        return PeftModel.from_pretrained(base, directory).eval()(ids).logits


def test_peft_reproduces_the_qft_model(tmp_path):
    model = _trained()
    export_peft(model, tmp_path / "out")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(_peft_logits(tmp_path / "out", ids), ours, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and not config["rank_pattern"]
    # the keys are the ones PEFT itself writes for the same layers
    reference = get_peft_model_state_dict(get_peft_model(tiny_llama(), LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])))
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == set(reference)


def test_ranks_and_scalings_that_differ_go_to_rank_and_alpha_patterns(tmp_path):
    model = _trained()
    name = "model.layers.1.mlp.down_proj"
    old = model.get_submodule(name)
    set_module(model, name, QLinear(old.weight.data, rank=2, alpha=6.0, lora_b=0.1 * torch.randn(64, 2)))
    export_peft(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"model\.layers\.1\.mlp\.down_proj": 2}
    assert config["alpha_pattern"] == {r"model\.layers\.1\.mlp\.down_proj": 6.0}
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(_peft_logits(tmp_path / "out", ids), ours, rtol=1e-4, atol=1e-5)


def test_a_model_without_low_rank_factors_is_refused(tmp_path):
    model = qft.quantize_and_prepare(tiny_llama(), bits="int4-ch", method="peqa", progress=False, cache_dir=False)
    with pytest.raises(ValueError, match="export_merged"):
        export_peft(model, tmp_path / "out")
    with pytest.raises(ValueError, match="no QLinear"):
        export_peft(tiny_llama(), tmp_path / "out")
