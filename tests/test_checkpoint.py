"""save_quantized / load_quantized / AutoModelForCausalLM.from_pretrained on a tiny Llama."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import SMALL_GRID, tiny_llama
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import qft
from qft.files.checkpoint import CheckpointError, checkpoint_sizes
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


def test_save_pretrained_of_a_prepared_model_reloads_identically(prepared, tmp_path):
    prepared.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qft" and config["report"]["method"] == "lqlora"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QLinear)
    assert torch.equal(logits(loaded), logits(prepared))


@pytest.mark.parametrize("options", [{}, {"peft": True, "rank": 2}])
def test_save_pretrained_of_a_halo_model_reloads_identically(options, tmp_path):
    from qft.nn import HaloLinear

    model = qft.quantize_and_prepare(tiny_llama(), method="halo", progress=False, **options)
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, HaloLinear)
    assert torch.equal(logits(loaded), logits(model))


def test_a_trainer_checkpoint_reloads_the_trained_model(tmp_path):
    model = tiny_llama()
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(tmp_path, max_steps=1, save_steps=1, per_device_train_batch_size=2, learning_rate=0.1,
                             report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 2).train()
    assert model.model.layers[0].mlp.up_proj.lora_B.abs().sum() > 0  # the step moved the adapters
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1")
    assert torch.equal(logits(loaded), logits(model.eval()))


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
    assert config["quant_method"] == "qft" and config["format_version"] == 2
    assert set(config["modules"]) == {n for n, m in prepared.named_modules() if isinstance(m, QLinear)}
    layer = prepared.model.layers[0].self_attn.q_proj
    spec = config["modules"]["model.layers.0.self_attn.q_proj"]
    assert spec["shape"] == [64, 64] and spec["rank"] == 4 and spec["alpha"] == 4 and spec["dtype"] == "float32"
    assert spec["format"] == layer.format.name
    stored = load_file(saved / "model.safetensors")
    assert spec["dtypes"] == {k: str(stored[f"model.layers.0.self_attn.q_proj.{k}"].dtype).removeprefix("torch.")
                              for k in spec["dtypes"]}  # every stored tensor's dtype, as stored


def test_size_on_disk_matches_reported_bits(prepared, saved):
    sizes = checkpoint_sizes(saved)
    report = prepared.qft_report
    assert 8 * sizes["quantized"] / sizes["parameters_quantized"] == report.bits
    with_adapters = 8 * (sizes["quantized"] + sizes["low_rank"]) / sizes["parameters_quantized"]
    assert with_adapters == report.bits_with_adapters
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


def test_a_cast_model_saves_and_loads_with_its_dtypes(tmp_path):
    """model.to(bfloat16) after preparation: every tensor keeps its dtype through save and load,
    alpha / rank is not rounded, and both loaders give the same logits."""
    model = tiny_llama()
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=6, alpha=16, progress=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLinear):
                m.lora_B.normal_(0, 0.02)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    for cast in (torch.bfloat16, torch.float16):
        model.to(cast)
        # .to() casts the rotary buffer, which is computed (never saved): a loaded model has it in fp32
        model.model.rotary_emb.inv_freq = inv_freq
        layer = model.model.layers[0].mlp.up_proj
        assert layer.scaling == 16 / 6 and layer.weight.dtype == cast and layer.weight.codes.dtype == torch.int32
        qft.save_quantized(model, tmp_path / str(cast))
        for loader in (qft.load_quantized, AutoModelForCausalLM.from_pretrained):
            loaded = loader(tmp_path / str(cast))
            again = loaded.model.layers[0].mlp.up_proj
            assert again.lora_A.dtype == cast and again.weight.dtype == cast and again.scaling == 16 / 6
            assert loaded.model.embed_tokens.weight.dtype == cast
            assert torch.equal(logits(loaded), logits(model))


def test_a_model_cast_after_loading_comes_back_in_its_dtypes(tmp_path):
    """from_pretrained records dtype float32 in the config; the model cast to bfloat16 after preparation
    must come back in bfloat16, every stored tensor in the dtype it was saved in."""
    tiny_llama().save_pretrained(tmp_path / "plain")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    model.model.rotary_emb.inv_freq = inv_freq  # computed, never saved: a loaded model has it in fp32
    qft.save_quantized(model, tmp_path / "bf16")
    for loader in (qft.load_quantized, AutoModelForCausalLM.from_pretrained):
        loaded = loader(tmp_path / "bf16")
        assert {k: t.dtype for k, t in loaded.state_dict().items()} == {k: t.dtype for k, t in model.state_dict().items()}
        assert torch.equal(logits(loaded), logits(model))


def test_save_in_bf16_is_smaller_and_loads_what_it_stored(prepared, saved, tmp_path):
    qft.save_quantized(prepared, tmp_path / "bf16", dtype=torch.bfloat16)
    small, full = checkpoint_sizes(tmp_path / "bf16"), checkpoint_sizes(saved)
    assert small["quantized"] == full["quantized"]  # packed codes and scales are never cast
    assert small["low_rank"] * 2 == full["low_rank"] and small["other"] < 0.55 * full["other"]
    loaded = qft.load_quantized(tmp_path / "bf16")
    assert loaded.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    qft.save_quantized(loaded, tmp_path / "again")
    assert torch.equal(logits(qft.load_quantized(tmp_path / "again")), logits(loaded))
    assert torch.allclose(logits(loaded).float(), logits(prepared), atol=0.05)


def test_sharded_checkpoints_are_written_and_read(prepared, tmp_path):
    qft.save_quantized(prepared, tmp_path / "sharded", max_shard_size=40_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    for loader in (qft.load_quantized, AutoModelForCausalLM.from_pretrained):
        assert torch.equal(logits(loader(tmp_path / "sharded")), logits(prepared))
    (tmp_path / "sharded" / files[1]).unlink()
    with pytest.raises(CheckpointError, match="missing; copy the whole checkpoint"):
        qft.load_quantized(tmp_path / "sharded")
