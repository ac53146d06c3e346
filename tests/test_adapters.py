import pytest
import torch
from helpers import tiny_llama

import qft
from qft.files.adapters import HEADER, WEIGHTS, adapter_tensors, base_fingerprint
from qft.files.checkpoint import CheckpointError
from qft.nn import QLinear


def _prepared(seed=0, method="qlora"):
    model = tiny_llama(seed)
    return qft.quantize_and_prepare(model, bits="nf4", method=method, rank=4, progress=False, seed=0)


def _train_a_little(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_tensors(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_swap_restores_the_trained_model_on_a_fresh_base(tmp_path):
    trained = _prepared()
    _train_a_little(trained)
    qft.save_adapter(trained, tmp_path / "task")
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == sorted([HEADER, WEIGHTS])

    base = _prepared()
    ids = torch.randint(0, 300, (2, 11))
    params_before = dict(adapter_tensors(base))
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, trained(ids).logits)
        qft.load_adapter(base, tmp_path / "task")
        assert torch.equal(base(ids).logits, trained(ids).logits)
    assert all(adapter_tensors(base)[k] is p for k, p in params_before.items())  # swapped in place
    assert base_fingerprint(base) == base_fingerprint(trained)


def test_trained_scales_travel_and_codes_do_not_move(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(QLinear.from_linear(torch.nn.Linear(48, 16), "int4-g16", train_scales=True),
                                QLinear.from_linear(torch.nn.Linear(16, 8), "int3-ch", train_scales=True))
    codes = [m.weight.codes.clone() for m in model]
    zeros = [m.weight.zero.clone() for m in model]
    trained_scales = [m.scale.detach() * 1.1 for m in model]
    with torch.no_grad():
        for m, s in zip(model, trained_scales):
            m.scale.copy_(s)
    assert set(adapter_tensors(model)) == {"0.weight_scale", "1.weight_scale"}
    qft.save_adapter(model, tmp_path / "scales")
    with torch.no_grad():
        for m in model:
            m.scale.mul_(0.5)
    qft.load_adapter(model, tmp_path / "scales")
    for m, s, c, z in zip(model, trained_scales, codes, zeros):
        assert torch.equal(m.scale, s)
        assert m.weight.scale is m.scale  # the weight still sees the trainable scale
        assert torch.equal(m.weight.codes, c) and torch.equal(m.weight.zero, z)


def test_refuses_another_base(tmp_path):
    trained = _prepared(seed=0)
    qft.save_adapter(trained, tmp_path / "a")
    other = _prepared(seed=1)
    before = {k: p.detach().clone() for k, p in adapter_tensors(other).items()}
    with pytest.raises(ValueError, match="another base"):
        qft.load_adapter(other, tmp_path / "a")
    assert all(torch.equal(p, before[k]) for k, p in adapter_tensors(other).items())  # nothing changed


def test_refuses_another_method(tmp_path):
    qft.save_adapter(_prepared(method="qlora"), tmp_path / "a")
    with pytest.raises(ValueError, match="is a 'qlora' adapter"):
        qft.load_adapter(_prepared(method="loftq"), tmp_path / "a")


def test_refuses_truncated_and_foreign_files(tmp_path):
    model = _prepared()
    folder = qft.save_adapter(model, tmp_path / "a")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        qft.load_adapter(model, folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a qft adapter"):
        qft.load_adapter(model, tmp_path / "empty")
    with pytest.raises(ValueError, match="no qft adapters"):
        qft.save_adapter(tiny_llama(), tmp_path / "b")


def test_fingerprint_ignores_adapters_of_shared_layers():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[1].mlp.gate_proj.weight
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    before = base_fingerprint(model)
    _train_a_little(model)
    assert base_fingerprint(model) == before
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # a frozen part
    assert base_fingerprint(model) != before


def test_adapter_loads_onto_a_saved_and_reloaded_base(tmp_path):
    model = _prepared()
    qft.save_quantized(model, tmp_path / "base")
    _train_a_little(model)
    qft.save_adapter(model, tmp_path / "task")
    base = qft.load_quantized(tmp_path / "base")
    qft.load_adapter(base, tmp_path / "task")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, model(ids).logits)


def test_a_halo_peft_adapter_swaps_onto_a_fresh_halo_base(tmp_path):
    def halo():
        return qft.quantize_and_prepare(tiny_llama(), method="halo", peft=True, rank=4, level=2, progress=False)

    trained = halo()
    _train_a_little(trained)
    assert {k.rpartition(".")[2] for k in adapter_tensors(trained)} == {"lora_A", "lora_B"}  # the base stays out
    qft.save_adapter(trained, tmp_path / "task")
    base = halo()
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, trained(ids).logits)
        qft.load_adapter(base, tmp_path / "task")
        assert torch.equal(base(ids).logits, trained(ids).logits)
