"""The qft command, end to end on a tiny Llama that uses SmolLM2's tokenizer."""

import json

import pytest
from helpers import tiny_with_smollm2_tokenizer

import qft
from qft.cli import build_parser, main
from qft.exports.compeft import info as compressed_info

COMMANDS = ["quantize", "train", "eval", "export", "compress", "decompress", "info"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qft {command}") and "--quiet" in out


def test_help_lists_the_commands(capsys):
    build_parser().print_help()
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_with_smollm2_tokenizer(tmp_path_factory.mktemp("base"))


def _notes(folder):
    """40 short records as a .jsonl file (train and test splits of a few blocks each)."""
    data = folder / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: the quick brown fox jumps over the lazy dog. " * 8}) + "\n"
                            for i in range(40)))
    return data


def test_quantize_train_eval_export_info(base, tmp_path, capsys):
    data = _notes(tmp_path)
    q, t, m = tmp_path / "q", tmp_path / "t", tmp_path / "m"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "nf4", "--method", "loftq", "--rank", "2",
                 "--out", str(q)]) == 0
    assert (q / "config.json").is_file() and (q / "tokenizer.json").is_file()
    assert main(["train", "-q", str(q), "--out", str(t), "--data", str(data), "--steps", "2", "--batch-size", "1",
                 "--block-size", "32", "--eval-blocks", "2", "--save-every", "1", "--warmup", "1",
                 "--device", "cpu", "--precision", "bf16", "--save-dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "step 0: held-out perplexity" in out and "step 2: held-out perplexity" in out
    assert (tmp_path / "t-checkpoints" / "checkpoint-2").is_dir()
    spec = json.loads((t / "config.json").read_text())["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]
    assert spec["dtypes"]["lora_A"] == "bfloat16" and spec["dtypes"]["weight_scale"] == "float32"
    assert main(["eval", "-q", str(t), "--data", str(data), "--block-size", "32", "--max-blocks", "2"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert main(["export", "-q", str(t), "--merged", "--out", str(m)]) == 0
    assert json.loads((m / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert main(["eval", "-q", str(m), "--data", str(data), "--block-size", "32", "--max-blocks", "2"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert main(["info", str(t)]) == 0
    out = capsys.readouterr().out
    assert "14 quantized matrices" in out and "nf4-b64 x14" in out and "bits/param" in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qft info: error:") and "no config.json" in err
    assert main(["eval", "-q", str(tmp_path / "missing")]) == 2


def test_train_adapter_out_and_eval_adapter(base, tmp_path, capsys):
    data = _notes(tmp_path)
    q, t, a = tmp_path / "q", tmp_path / "t", tmp_path / "a"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "nf4", "--method", "qlora", "--rank", "2",
                 "--out", str(q)]) == 0
    assert main(["train", "-q", str(q), "--data", str(data), "--steps", "2", "--batch-size", "1"]) == 2
    assert "--adapter-out" in capsys.readouterr().err
    assert main(["train", "-q", str(q), "--out", str(t), "--adapter-out", str(a), "--data", str(data), "--steps", "2",
                 "--batch-size", "1", "--block-size", "32", "--eval-blocks", "0", "--lr", "1e-2"]) == 0
    capsys.readouterr()
    evaluate = ["--data", str(data), "--block-size", "32", "--max-blocks", "2"]
    assert main(["eval", "-q", str(t), *evaluate]) == 0
    trained = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["eval", "-q", str(q), "--adapter", str(a), *evaluate]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == trained  # the base + the adapter = the trained model
    assert main(["eval", "-q", str(q), *evaluate]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] != trained


def test_a_peqa_export_evaluates_as_the_trained_model(base, tmp_path, capsys):
    data = _notes(tmp_path)
    q, t, m = tmp_path / "q", tmp_path / "t", tmp_path / "m"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "4", "--method", "peqa", "--out", str(q)]) == 0
    assert main(["train", "-q", str(q), "--out", str(t), "--data", str(data), "--steps", "2", "--batch-size", "1",
                 "--block-size", "32", "--eval-blocks", "0", "--lr", "1e-2"]) == 0
    assert main(["export", "-q", str(t), "--merged", "--out", str(m)]) == 0
    capsys.readouterr()
    evaluate = ["--data", str(data), "--block-size", "32", "--max-blocks", "2"]
    lines = []
    for folder in (q, t, m):
        assert main(["eval", "-q", str(folder), *evaluate]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[2] == lines[1] != lines[0]  # the export is the trained model, which differs from the start


def test_compress_decompress_info(base, tmp_path, capsys):
    data = _notes(tmp_path)
    q, a, c, back = tmp_path / "q", tmp_path / "a", tmp_path / "a.qftc", tmp_path / "back"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "nf4", "--method", "qlora", "--rank", "2",
                 "--out", str(q)]) == 0
    assert main(["train", "-q", str(q), "--adapter-out", str(a), "--data", str(data), "--steps", "2",
                 "--batch-size", "1", "--block-size", "32", "--eval-blocks", "0", "--lr", "1e-2"]) == 0
    assert main(["compress", "-q", str(a), "--out", str(c), "--density", "0.1"]) == 2
    assert "pass base=" in capsys.readouterr().err
    assert main(["compress", "-q", str(a), "--base", str(q), "--out", str(c), "--density", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "qft adapter (qlora)" in out and "entropy bound" in out
    assert main(["decompress", "-q", str(c), "--base", str(q), "--out", str(back)]) == 0
    assert (back / "adapter.safetensors").is_file()
    assert main(["info", str(c)]) == 0
    assert "density 0.1" in capsys.readouterr().out
    assert compressed_info(c)["scope"] == "tensor"  # the default: per tensor


def test_export_dense_and_peft(base, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "nf4", "--method", "loftq", "--rank", "2",
                 "--out", str(q)]) == 0
    assert main(["export", "-q", str(q), "--dense", "--out", str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert main(["export", "-q", str(q), "--peft", "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 2
    assert (tmp_path / "peft" / "base" / "model.safetensors").is_file()


def test_int21_quantize_and_train_with_a_teacher(base, tmp_path, capsys):
    data = _notes(tmp_path)
    q, t = tmp_path / "q", tmp_path / "t"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "2", "--method", "int21", "--rank", "4",
                 "--out", str(q)]) == 0
    report = json.loads((q / "config.json").read_text())["quantization_config"]["report"]
    assert report["method"] == "int21" and report["rounding"] == "gptq"
    assert main(["train", "-q", str(q), "--out", str(t), "--data", str(data), "--steps", "2", "--batch-size", "1",
                 "--block-size", "32", "--eval-blocks", "2", "--warmup", "1", "--teacher", str(base),
                 "--top-k", "8"]) == 0
    state = json.loads((tmp_path / "t-checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["objective"] == "LREC"
    capsys.readouterr()
    assert main(["train", "-q", str(q), "--out", str(t), "--data", str(data), "--steps", "1",
                 "--teacher", str(tmp_path / "missing")]) != 0
    assert "missing is not a Hugging Face model folder" in capsys.readouterr().err


def test_halo_quantize_train_and_reload(base, tmp_path, capsys):
    data = _notes(tmp_path)
    q, t = tmp_path / "q", tmp_path / "t"
    assert main(["quantize", "-q", "--model", str(base), "--method", "halo", "--precision", "int8", "--level", "1",
                 "--peft", "--rank", "4", "--out", str(q)]) == 0
    config = json.loads((q / "config.json").read_text())["quantization_config"]
    layer = config["modules"]["model.layers.0.mlp.down_proj"]
    assert layer["layer"] == "halo" and layer["precision"] == "int8" and layer["level"] == 1 and layer["rank"] == 4
    assert main(["train", "-q", str(q), "--out", str(t), "--data", str(data), "--steps", "2", "--batch-size", "1",
                 "--block-size", "32", "--eval-blocks", "2", "--warmup", "1"]) == 0
    assert "step 2: held-out perplexity" in capsys.readouterr().out
    assert main(["eval", "-q", str(t), "--data", str(data), "--block-size", "32", "--max-blocks", "2"]) == 0


def test_a_method_without_bits_refuses_them_and_the_default_bits_are_the_methods(base, tmp_path, capsys):
    assert main(["quantize", "-q", "--model", str(base), "--method", "halo", "--bits", "4",
                 "--out", str(tmp_path / "h")]) != 0
    assert "drop ['--bits']" in capsys.readouterr().err and not (tmp_path / "h").exists()
    assert main(["quantize", "-q", "--model", str(base), "--method", "qlora", "--out", str(tmp_path / "q")]) == 0
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["format"] for m in modules.values()} == {"nf4-b64"}  # QLoRA's NF4, not the 2.5-bit budget


def test_halo_level_zero_is_level_zero(base, tmp_path):
    """--level 0 (no rotation) is an option given, not an option left out (which means level 2)."""
    for level in (0, 2):
        out = tmp_path / f"level{level}"
        assert main(["quantize", "-q", "--model", str(base), "--method", "halo", "--level", str(level),
                     "--out", str(out)]) == 0
        modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
        assert {m["level"] for m in modules.values()} == {level}


def test_quantize_records_the_config_the_library_builds(base, tmp_path):
    from qft.methods.config import QuantConfig

    assert main(["quantize", "-q", "--model", str(base), "--method", "qlora", "--bits", "int4-g32", "--rank", "2",
                 "--seed", "3", "--out", str(tmp_path / "q")]) == 0
    written = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config"]
    assert QuantConfig.from_dict(written) == qft.QLoRAConfig(bits="int4-g32", rank=2, seed=3)


def test_streaming_quantize_writes_the_same_checkpoint(base, tmp_path):
    from safetensors.torch import load_file

    loaded, streamed = tmp_path / "loaded", tmp_path / "streamed"
    for out, extra in ((loaded, []), (streamed, ["--streaming"])):
        assert main(["quantize", "-q", "--model", str(base), "--bits", "nf3-b64", "--method", "qlora", "--rank", "2",
                     "--out", str(out), *extra]) == 0
    a, b = load_file(loaded / "model.safetensors"), load_file(streamed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_quantize_over_llama_cpp_types_and_export_gguf(base, tmp_path, capsys):
    import gguf

    q, out = tmp_path / "q", tmp_path / "smol.gguf"
    assert main(["quantize", "-q", "--model", str(base), "--bits", "5", "--formats", "gguf", "--rank", "2",
                 "--out", str(q)]) == 0
    assert main(["export", "-q", str(q), "--gguf", "--out", str(out)]) == 0
    assert "--lora" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    projections = {v for k, v in types.items() if k.startswith("blk.") and not k.endswith("norm.weight")}
    assert projections <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} and len(projections) > 1, types  # 64 wide: no K type
    assert types["token_embd.weight"] == "F16"
    lora = gguf.GGUFReader(tmp_path / "smol-lora.gguf")
    assert bytes(lora.fields["general.type"].parts[-1]).decode() == "adapter"
    assert "blk.0.attn_q.weight.lora_a" in {t.name for t in lora.tensors}
    # merged and rounded once into each layer's own type: the same types, no adapter file
    one = tmp_path / "one.gguf"
    assert main(["export", "-q", str(q), "--gguf", "--merge-lora", "requantized", "--out", str(one)]) == 0
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(one).tensors} == types
    assert not (tmp_path / "one-lora.gguf").exists()
