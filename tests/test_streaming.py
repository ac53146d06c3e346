"""Streaming quantization (a model folder read one tensor at a time) gives the same model as
quantizing the loaded model, and refuses what it cannot do."""

import pytest
import torch
from helpers import SMALL_GRID, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qft
from qft.files.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=3).save_pretrained(path, max_shard_size="100KB")  # several shards and an index
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


@pytest.mark.parametrize("bits, method", [(2.75, "lqlora"), ("nf3-b64", "qlora"), ("int4-g64", "peqa")])
def test_streamed_equals_loaded(folder, bits, method):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    kwargs = dict(bits=bits, method=method, formats=SMALL_GRID if method == "lqlora" else None, progress=False,
                  rank=None if method == "peqa" else 8,
                  cache_dir=False)
    loaded = qft.quantize_and_prepare(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                      **kwargs)
    streamed = qft.quantize_and_prepare(folder, **kwargs)
    assert [m.format for m in streamed.qft_report.matrices] == [m.format for m in loaded.qft_report.matrices]
    assert not any(p.is_meta for p in streamed.parameters())
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert sorted(n for n, p in streamed.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in loaded.named_parameters() if p.requires_grad)


def test_streaming_refuses_what_needs_the_whole_model(folder):
    with pytest.raises(ValueError, match="streaming quantization never holds"):
        qft.quantize_and_prepare(folder, fisher=True, tokenizer=object())
    with pytest.raises(ValueError, match="streaming quantization never holds"):
        qft.quantize_and_prepare(folder, method="int21")  # GPTQ is int21's own rounding
    with pytest.raises(ValueError, match="takes a loaded model"):
        qft.quantize_and_prepare(folder, method="halo")


def test_streaming_bad_folders(folder, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        qft.quantize_and_prepare(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="down_proj.weight"):
        qft.quantize_and_prepare(broken, bits="nf4", method="qlora", progress=False)
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        qft.quantize_and_prepare(broken, bits="nf4", method="qlora", progress=False)
    (broken / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        qft.quantize_and_prepare(broken, bits="nf4", method="qlora", progress=False)


def test_streaming_reads_the_shards_the_index_lists(folder, tmp_path):
    import json
    import shutil

    from qft.prepare.streaming import FileTensors

    copy = tmp_path / "indexed"
    shutil.copytree(folder, copy)
    listed = set(json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"].values())
    name = "model.layers.1.mlp.down_proj.weight"
    stale = load_file(next(copy / f for f in listed if name in load_file(copy / f)))[name]
    save_file({name: torch.full_like(stale, float("nan"))}, str(copy / "zz-stale.safetensors"))  # not in the index
    tensors = FileTensors(copy)
    assert {f.name for f in tensors.file_of.values()} == listed
    assert torch.equal(tensors[name], stale)
    qft.quantize_and_prepare(copy, bits="nf4", method="qlora", progress=False)  # no NaN read from the stale file
