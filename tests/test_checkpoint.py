"""save_quantized / load_quantized / AutoModelForCausalLM.from_pretrained on a tiny Llama."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import SMALL_GRID, tiny_llama
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qft
from qft.checkpoint import CheckpointError, checkpoint_sizes
from qft.nn import QLinear


@pytest.fixture(scope="module")
def prepared():
    model = tiny_llama()
    qft.quantize_and_prepare(model, bits=3.0, rank=4, formats=SMALL_GRID, cache_dir=False, progress=False)
    with torch.no_grad():  # a trained-looking adapter, so that B is not zero
        for m in model.modules():
            if isinstance(m, QLinear):
                m.lora_B.add_(0.01 * torch.randn_like(m.lora_B))
    return model


@pytest.fixture
def saved(prepared, tmp_path):
    return qft.save_quantized(prepared, tmp_path / "ckpt")


def logits(model, seed=0):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_load_quantized_gives_identical_logits(prepared, saved):
    loaded = qft.load_quantized(saved)
    assert torch.equal(logits(loaded), logits(prepared))
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert sum(isinstance(m, QLinear) for m in loaded.modules()) == 14


def test_transformers_from_pretrained_reads_qft_checkpoints(prepared, saved):
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QLinear)
    assert torch.equal(logits(loaded), logits(prepared))


def test_from_pretrained_in_a_fresh_process(prepared, saved):
    # nothing cached yet (codebooks are computed while transformers builds on the meta device)
    code = ("import sys, torch, qft; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(m(torch.arange(12).view(1, 12)).logits.sum().item())")
    out = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True, check=True)
    with torch.no_grad():
        expected = prepared(torch.arange(12).view(1, 12)).logits.sum().item()
    assert float(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("loader", [qft.load_quantized, AutoModelForCausalLM.from_pretrained])
def test_a_loaded_model_saves_again_unchanged(prepared, saved, tmp_path, loader):
    qft.save_quantized(loader(saved), tmp_path / "again")
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == load_file(saved / "model.safetensors").keys()
    first, second = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (saved, tmp_path / "again"))
    assert first == second  # the modules and the quantization report survive the round trip
    assert torch.equal(logits(qft.load_quantized(tmp_path / "again")), logits(prepared))


def test_tied_embeddings_are_saved_once_and_tied_again(tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    qft.save_quantized(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    for loaded in (qft.load_quantized(tmp_path / "tied"), AutoModelForCausalLM.from_pretrained(tmp_path / "tied")):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(logits(loaded), logits(model))


def test_config_describes_every_quantized_layer(prepared, saved):
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qft" and config["format_version"] == 1
    assert set(config["modules"]) == {n for n, m in prepared.named_modules() if isinstance(m, QLinear)}
    spec = config["modules"]["model.layers.0.self_attn.q_proj"]
    assert spec["shape"] == [64, 64] and spec["rank"] == 4
    assert spec["format"] == prepared.model.layers[0].self_attn.q_proj.format.name


def test_size_on_disk_matches_reported_bits(prepared, saved):
    sizes = checkpoint_sizes(saved)
    report = prepared.qft_report
    assert 8 * sizes["quantized"] / sizes["parameters_quantized"] == pytest.approx(report.bits, rel=0.02)
    with_low_rank = 8 * (sizes["quantized"] + sizes["low_rank"]) / sizes["parameters_quantized"]
    assert with_low_rank == pytest.approx(report.bits_with_low_rank, rel=0.02)
    assert sizes["file"] >= sizes["quantized"] + sizes["low_rank"] + sizes["other"]


def test_truncated_file_is_refused(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        qft.load_quantized(saved)
    # transformers reads the header itself first and raises safetensors' own error
    with pytest.raises((CheckpointError, SafetensorError), match="truncated|incomplete"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_tensor_is_refused(saved):
    path = saved / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.self_attn.v_proj.weight_codes"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.v_proj.weight_codes'\]"):
        qft.load_quantized(saved)
    with pytest.raises(CheckpointError, match="missing tensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_wrong_shape_is_refused(saved):
    path = saved / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.mlp.up_proj.lora_A"] = torch.zeros(5, 64)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="up_proj.lora_A"):
        qft.load_quantized(saved)


@pytest.mark.parametrize("change, message", [
    (lambda q: q.update(format_version=99), "format 99"),
    (lambda q: q.update(quant_method="gptq"), "not a qft checkpoint"),
])
def test_other_versions_and_methods_are_refused(saved, change, message):
    config = json.loads((saved / "config.json").read_text())
    change(config["quantization_config"])
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        qft.load_quantized(saved)


def test_plain_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        qft.load_quantized(tmp_path)


def test_saving_replaces_a_folder_whole(prepared, saved):
    (saved / "stale.txt").write_text("from an earlier save")
    qft.save_quantized(prepared, saved)
    assert not (saved / "stale.txt").exists()
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantize_and_prepare"):
        qft.save_quantized(tiny_llama(), tmp_path / "x")
