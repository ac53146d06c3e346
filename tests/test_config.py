"""One config object per method: it checks itself when built, quantize_ applies it, checkpoints record it."""

import json

import pytest
import torch
from helpers import SMALL_GRID, tiny_llama, tiny_with_smollm2_tokenizer

import qft
from qft.methods.config import QuantConfig, config_for, parse_bits
from qft.nn import HaloLinear, QLinear


def ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make, message", [
    (lambda: qft.LQLoRAConfig(rank=-1), "rank must be >= 0"),
    (lambda: qft.LQLoRAConfig(rank=0), "needs rank >= 1"),
    (lambda: qft.LQLoRAConfig(alpha=0), "alpha must be > 0"),
    (lambda: qft.LQLoRAConfig(bits="nf9"), "bit width 9"),
    (lambda: qft.LQLoRAConfig(bits=-1.0), "must be > 0"),
    (lambda: qft.LQLoRAConfig(rounding="stochastic"), "rounding"),
    (lambda: qft.LQLoRAConfig(solver="gurobi"), "solver"),
    (lambda: qft.LQLoRAConfig(formats=["nf4", "nf11"]), "bit width 11"),
    (lambda: qft.LQLoRAConfig(skip_modules="lm_head"), "list of module names"),
    (lambda: qft.HALOConfig(level=3), "level"),
    (lambda: qft.HALOConfig(precision="fp4"), "precision"),
    (lambda: qft.HALOConfig(rank=8), "applies with peft=True"),
    (lambda: qft.BudgetConfig(method="nope"), "unknown method"),
    (lambda: qft.BudgetConfig(method="halo"), "without a bit budget"),
    (lambda: qft.WholeModelConfig(method="halo", options={"colour": 1}), "unexpected option"),
    (lambda: config_for("lqlora", level=2), "unexpected option"),
])
def test_a_bad_option_fails_when_the_config_is_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_configs_are_frozen():
    config = qft.LQLoRAConfig(bits=3.0)
    with pytest.raises(AttributeError):
        config.bits = 2.0


@pytest.mark.parametrize("config, keywords", [
    (qft.LQLoRAConfig(bits=3.0, rank=4, formats=SMALL_GRID), dict(bits=3.0, rank=4, formats=SMALL_GRID)),
    (qft.QLoRAConfig(rank=2), dict(bits="nf4", method="qlora", rank=2)),
    (qft.PEQAConfig(bits=4), dict(bits=4, method="peqa")),
    (qft.HALOConfig(level=0, peft=True, rank=4), dict(method="halo", level=0, peft=True, rank=4)),
])
def test_quantize_underscore_equals_the_keyword_form(config, keywords, tmp_path):
    a = qft.quantize_(tiny_llama(), config, cache_dir=tmp_path, progress=False)
    b = qft.quantize_and_prepare(tiny_llama(), cache_dir=tmp_path, progress=False, **keywords) if \
        config.method != "halo" else qft.quantize_and_prepare(tiny_llama(), progress=False, **keywords)
    assert a.qft_config == b.qft_config == config
    kind = HaloLinear if config.method == "halo" else QLinear
    assert isinstance(a.model.layers[0].mlp.down_proj, kind)
    with torch.no_grad():
        assert torch.equal(a(ids()).logits, b(ids()).logits)


def test_a_checkpoint_says_how_it_was_made(tmp_path):
    config = qft.QLoRAConfig(bits="int4-g32", rank=2, alpha=4.0, skip_modules=["mlp.up_proj"], seed=3)
    model = qft.quantize_(tiny_llama(), config, progress=False)
    assert model.config.quantization_config.config == config.to_dict()
    qft.save_quantized(model, tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config"]
    assert QuantConfig.from_dict(written) == config
    loaded = qft.load_quantized(tmp_path / "q")
    qft.save_quantized(loaded, tmp_path / "again")  # a loaded model keeps the record
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["config"]
    assert again == written


def test_from_dict_refuses_what_a_config_does_not_take():
    with pytest.raises(ValueError, match="no option"):
        QuantConfig.from_dict({"method": "lqlora", "bits": 3.0, "colour": "red"})
    assert QuantConfig.from_dict(qft.HALOConfig(level=1).to_dict()) == qft.HALOConfig(level=1)


def test_bits_from_the_command_line_and_a_config_that_is_not_one():
    assert parse_bits("4") == 4 and parse_bits("2.5") == 2.5 and parse_bits("nf3-b64") == "nf3-b64"
    with pytest.raises(ValueError, match="config must be a qft config"):
        qft.quantize_(tiny_llama(), {"method": "lqlora"})
    with pytest.raises(ValueError, match="no handler applies a QuantConfig"):
        qft.quantize_(tiny_llama(), QuantConfig(method="lqlora"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A full-precision model folder with a real tokenizer (quantize on load reads calibration text with it)."""
    return tiny_with_smollm2_tokenizer(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("config", [
    qft.QLoRAConfig(bits="int4-g32", rank=2),
    qft.LQLoRAConfig(bits=3.0, rank=2, formats=SMALL_GRID),
    qft.PEQAConfig(bits=4),
    qft.LQLoRAConfig(bits=3.0, rank=2, fisher=True, formats=SMALL_GRID),
    qft.HALOConfig(level=1, peft=True, rank=2),
])
def test_quantize_on_load_equals_quantize_underscore_on_the_loaded_model(config, folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_load = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder) if config.method == "lqlora" else None
    after = qft.quantize_(AutoModelForCausalLM.from_pretrained(folder), config, tokenizer=tokenizer, progress=False)
    assert on_load.qft_config == config and on_load.config.quantization_config.config == config.to_dict()
    assert on_load.state_dict().keys() == after.state_dict().keys()
    for key, value in on_load.state_dict().items():
        assert torch.equal(value, after.state_dict()[key]), key
    on_load.save_pretrained(tmp_path / "q")  # and it saves as a qft checkpoint
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, on_load(ids()).logits)


@pytest.mark.parametrize("config, streamed", [(qft.LQLoRAConfig(bits=3.0, rank=2, formats=SMALL_GRID), True),
                                              (qft.LQLoRAConfig(bits=3.0, rank=2, rounding="gptq"), False)])
def test_quantize_on_load_streams_unless_calibration_needs_the_whole_model(config, streamed, folder, monkeypatch):
    """Streamed: no target weight was held in full precision by the time the planned layers go in (each
    is a zero-size placeholder); with GPTQ rounding the model is loaded whole and quantize_ runs on it."""
    from transformers import AutoModelForCausalLM

    import qft.prepare.quantize as front

    held = {}
    real_swap_in = front.swap_in

    def spy(model, config, layers, report):
        held.update({n: model.get_submodule(n).weight.numel() for n in layers})
        return real_swap_in(model, config, layers, report)

    monkeypatch.setattr(front, "swap_in", spy)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    assert len(qft.nn.qft_layers(model)) == len(held) > 0
    if streamed:
        assert set(held.values()) == {0}
    else:
        assert 0 not in held.values()


def test_quantize_on_load_refuses_what_is_not_a_qft_config(folder):
    from transformers import AutoModelForCausalLM

    from qft.prepare.hf_quantizer import QftConfig

    with pytest.raises(ValueError, match="takes a qft config object"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=QftConfig())
