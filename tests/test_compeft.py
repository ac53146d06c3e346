"""ComPEFT: ternary updates, their file (Rice-coded positions, sign bits, checksum), and adapters."""

import json
import logging
import math

import pytest
import torch
from helpers import tiny_llama

import qft
from qft.files.checkpoint import CheckpointError
from qft.exports.compeft import (
    ALPHA_MAX_STEPS,
    ALPHA_RATIO,
    best_alpha,
    compress,
    compress_adapter,
    decompress,
    decompress_adapter,
    entropy_bits,
    info,
    least_squares_alpha,
    load_compressed,
    save_compressed,
)


def _update(seed=0, shapes=((64, 48), (48, 64), (300,))):
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(shape, generator=gen) for i, shape in enumerate(shapes)}


def test_keeps_the_largest_entries_as_signs_times_alpha_sigma():
    update = _update()
    ternary = compress(update, 0.1, alpha=2.0, scope="global")
    whole = torch.cat([t.reshape(-1) for t in update.values()])
    kept = torch.cat([update[n].reshape(-1)[t.positions] for n, t in ternary.items()])
    assert kept.numel() == round(0.1 * whole.numel())
    assert kept.abs().min() >= whole.abs().sort().values[-kept.numel() - 1]  # nothing dropped is larger
    dense = decompress(ternary)
    for name, t in ternary.items():
        assert t.scale == pytest.approx(2.0 * float(whole.std()))
        assert set(dense[name].unique().tolist()) <= {-t.scale, 0.0, t.scale}
        flat = dense[name].reshape(-1)
        assert torch.equal(flat[t.positions] < 0, update[name].reshape(-1)[t.positions] < 0)  # signs kept


def test_tensor_scope_keeps_the_density_in_each_tensor():
    update = _update(shapes=((100,), (1000,)))
    update["t1"] *= 100  # globally, the big tensor would take every kept entry
    glob, per = compress(update, 0.1, scope="global"), compress(update, 0.1)
    assert glob["t0"].positions.numel() == 0 and glob["t1"].positions.numel() == 110
    assert per["t0"].positions.numel() == 10 and per["t1"].positions.numel() == 100
    assert per["t0"].scale == pytest.approx(float(update["t0"].std()))


def test_bad_density_and_nan_are_refused():
    with pytest.raises(ValueError, match="density"):
        compress(torch.ones(3), 0)
    with pytest.raises(ValueError, match="NaN"):
        compress(torch.tensor([1.0, float("nan")]), 0.5)


@pytest.mark.parametrize("density", [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.99])
def test_the_file_decodes_exactly_and_is_near_the_entropy_bound(density, tmp_path):
    update = _update(seed=1, shapes=((512, 400),))
    ternary = compress(update, density, alpha=1.3)
    size = save_compressed(tmp_path / "u.qftc", ternary, {"kind": "test"})
    header, back = load_compressed(tmp_path / "u.qftc")
    for name, t in ternary.items():
        assert torch.equal(back[name].positions, t.positions) and torch.equal(back[name].negative, t.negative)
        assert back[name].scale == t.scale and back[name].shape == t.shape
        assert torch.equal(back[name].to_dense(), t.to_dense())
    payload = sum(e["position_bytes"] + e["sign_bytes"] for e in header["tensors"])
    bound = entropy_bits(ternary["t0"].positions.numel(), 512 * 400) / 8
    assert payload <= 1.10 * bound  # within 10 % of log2 C(n, k) + k bits
    assert size < 2 * 512 * 400 * density  # far under fp16 for the kept entries alone
    if density == 0.5:  # parameter 0: a bitmask up to the last kept entry
        assert header["tensors"][0]["positions"]["k"] == 0
        assert payload <= math.ceil(512 * 400 / 8) + math.ceil(ternary["t0"].positions.numel() / 8)
    assert header["tensors"][0]["positions"]["complement"] == (density > 0.5)  # nearly full: the gaps are coded


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_a_damaged_or_foreign_file_is_refused(damage, tmp_path):
    path = tmp_path / "u.qftc"
    save_compressed(path, compress(_update(), 0.05), {"kind": "test"})
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[:-7]
    elif damage == "foreign":
        data = b"PK\x03\x04" + data[4:]
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged|truncated|not a qft compressed"):
        load_compressed(path)


def _trained_qft(tmp_path, method="qlora", **kwargs):
    """(base checkpoint folder as prepared, adapter folder after 'training' moved every adapter)."""
    model = qft.quantize_and_prepare(tiny_llama(), method=method, progress=False, cache_dir=False, **kwargs)
    qft.save_quantized(model, tmp_path / "base")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    qft.save_adapter(model, tmp_path / "adapter")
    return model


@pytest.mark.parametrize("method,kwargs", [("qlora", {"bits": "nf4", "rank": 4}), ("peqa", {"bits": "int4-ch"}),
                                           ("halo", {"peft": True, "rank": 4})])  # HALO-PEFT: its LoRA factors
def test_a_qft_adapter_round_trips_as_initial_plus_ternary_update(method, kwargs, tmp_path):
    trained = _trained_qft(tmp_path, method, **kwargs)
    summary = compress_adapter(tmp_path / "adapter", tmp_path / "a.qftc", density=0.2, alpha=1.0,
                               base=tmp_path / "base")
    assert summary["kind"] == "qft" and summary["payload_bytes"] < summary["fp16_bytes"] / 4
    decompress_adapter(tmp_path / "a.qftc", tmp_path / "back", base=tmp_path / "base")
    base = qft.load_quantized(tmp_path / "base")
    start = {n: p.detach().clone() for n, p in qft.files.adapters.adapter_tensors(base).items()}
    qft.load_adapter(base, tmp_path / "back")
    _, ternary = load_compressed(tmp_path / "a.qftc")
    now = qft.files.adapters.adapter_tensors(base)
    trained_values = qft.files.adapters.adapter_tensors(trained)
    for name, t in ternary.items():
        assert torch.equal(now[name], (start[name] + t.to_dense()).to(start[name].dtype))
        moved = trained_values[name] - start[name]
        assert torch.equal(t.to_dense().reshape(-1)[t.positions] > 0, moved.reshape(-1)[t.positions] > 0)


def test_a_qft_adapter_is_refused_by_another_base(tmp_path):
    _trained_qft(tmp_path)
    other = qft.quantize_and_prepare(tiny_llama(seed=1), bits="nf4", method="qlora", rank=4, progress=False,
                                     cache_dir=False)
    with pytest.raises(ValueError, match="another base"):
        compress_adapter(tmp_path / "adapter", tmp_path / "a.qftc", density=0.1, alpha=1.0, base=other)
    compress_adapter(tmp_path / "adapter", tmp_path / "a.qftc", density=0.1, alpha=1.0, base=tmp_path / "base")
    with pytest.raises(ValueError, match="another base"):
        decompress_adapter(tmp_path / "a.qftc", tmp_path / "back", base=other)
    with pytest.raises(ValueError, match="base="):
        decompress_adapter(tmp_path / "a.qftc", tmp_path / "back")


def test_alpha_is_searched_on_validation_text(tmp_path):
    _trained_qft(tmp_path)
    texts = ["the quick brown fox jumps over the lazy dog " * 60]

    class Chars:  # a tokenizer for the tiny vocabulary: one id per character
        eos_token = "\n"

        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = torch.tensor([[ord(c) % 300 for c in text]])
            return type("Encoded", (), {"input_ids": ids})()

    base = qft.load_quantized(tmp_path / "base")
    start = {n: p.detach().clone() for n, p in qft.files.adapters.adapter_tensors(base).items()}
    summary = compress_adapter(tmp_path / "adapter", tmp_path / "a.qftc", density=0.1, base=base,
                               tokenizer=Chars(), texts=texts, progress=False)
    assert summary["alpha"] > 0
    for name, p in qft.files.adapters.adapter_tensors(base).items():
        assert torch.equal(p, start[name])  # the search leaves the caller's base as it came
    with pytest.raises(ValueError, match="alpha="):
        compress_adapter(tmp_path / "adapter", tmp_path / "b.qftc", density=0.1, base=tmp_path / "base")


@pytest.mark.parametrize("peak,expected", [(3.0, 5), (0.3, -5), (1.0, 0)])
def test_the_alpha_search_walks_to_the_peak_beyond_two_times_least_squares(peak, expected):
    tried = []

    def score(alpha):
        tried.append(alpha)
        return -(math.log(alpha) - math.log(peak)) ** 2

    assert best_alpha(score, 1.0) == pytest.approx(ALPHA_RATIO**expected)
    assert len(tried) == len(set(tried)) <= abs(expected) + 3  # one step past the peak, and one the other way


def test_the_alpha_search_stops_at_its_farthest_step():
    assert best_alpha(lambda alpha: alpha, 2.0) == pytest.approx(2.0 * ALPHA_RATIO**ALPHA_MAX_STEPS)


def test_alpha_is_searched_for_the_callers_score(tmp_path):
    """score= replaces perplexity: here the distance to the trained adapter, whose best α is least squares'."""
    from qft.files.adapters import adapter_tensors, read_adapter

    _trained_qft(tmp_path, bits="nf4", rank=4)
    base = qft.load_quantized(tmp_path / "base")
    start = {n: p.detach().clone() for n, p in adapter_tensors(base).items()}
    trained = read_adapter(tmp_path / "adapter")[1]
    models, values = set(), []

    def closeness(model):
        models.add(id(model))
        params = adapter_tensors(model)
        values.append(-sum(float((params[n].float() - t.float()).pow(2).sum()) for n, t in trained.items()))
        return values[-1]

    summary = compress_adapter(tmp_path / "adapter", tmp_path / "a.qftc", density=0.1, base=base, score=closeness,
                               progress=False)
    update = {n: t.float() - start[n].float() for n, t in trained.items()}
    assert summary["alpha"] == pytest.approx(least_squares_alpha(update, compress(update, 0.1, 1.0)), rel=1e-4)
    assert models == {id(base)} and len(values) == len(set(values)) == 3  # each α applied: k = 0, then 1, then -1
    for name, p in adapter_tensors(base).items():
        assert torch.equal(p, start[name])  # left as it came


def test_a_peft_adapter_round_trips_and_loads_in_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "peft")
    summary = compress_adapter(tmp_path / "peft", tmp_path / "p.qftc", density=0.05, alpha=1.0, base=tiny_llama())
    assert summary["kind"] == "peft" and summary["method"] == "peft-lora"
    with pytest.raises(ValueError, match="another base"):
        decompress_adapter(tmp_path / "p.qftc", tmp_path / "back", base=tiny_llama(seed=1))
    decompress_adapter(tmp_path / "p.qftc", tmp_path / "back", base=tiny_llama())
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["r"] == 4
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "back")
    _, ternary = load_compressed(tmp_path / "p.qftc")
    state = loaded.state_dict()
    for name, t in ternary.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(state[key], t.to_dense()), name


def test_info_reports_sizes_against_fp16_and_the_bound(tmp_path):
    save_compressed(tmp_path / "u.qftc", compress(_update(), 0.05, scope="global"),
                    {"kind": "test", "method": None, "density": 0.05, "alpha": 1.0, "scope": "global"})
    summary = info(tmp_path / "u.qftc")
    n = 64 * 48 * 2 + 300
    assert summary["parameters"] == n and summary["kept"] == round(0.05 * n)
    assert summary["fp16_bytes"] == 2 * n and summary["payload_over_bound"] < 1.1
    assert math.isfinite(summary["entropy_bound_bytes"])


def test_global_scope_warns_when_a_tensor_keeps_nothing(caplog):
    from qft.exports.compeft import compress

    update = {"lora_A": torch.randn(8, 64), "lora_B": 1e-4 * torch.randn(64, 8)}  # B ≪ A, as after short training
    with caplog.at_level(logging.WARNING, logger="qft.exports.compeft"):
        out = compress(update, 0.1, scope="global")
    assert out["lora_B"].positions.numel() == 0 and "scope='tensor'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qft.exports.compeft"):
        per_tensor = compress(update, 0.1)
    assert per_tensor["lora_B"].positions.numel() == 51 and not caplog.text  # 10 % of 512, rounded
