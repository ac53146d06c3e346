"""quantize_and_prepare, the allocator and the heat map on a tiny random Llama."""

import pytest
import torch
from helpers import CALIBRATION, SMALL_GRID, Chars, tiny_llama
from torch import nn

import qft
from qft.prepare.allocate import ErrorTable, allocate, error_table, nf_grid, pruned_grid, undominated
from qft.nn import QLinear
from qft.prepare.plot import bits_heatmap
from qft.prepare.quantize import quantize_and_prepare
from qft.quant.formats import get_format


def test_grid_is_lqlora_shaped():
    grid = nf_grid()
    assert len(grid) == 300 and len(set(grid)) == 300
    bits = sorted(f.nominal_bits(64, 64) for f in grid)
    assert bits[0] == pytest.approx(2 + 2 / 64 + 16 / (64 * 256))


def test_undominated_drops_only_dominated_columns():
    import numpy as np

    table = ErrorTable(["a", "b"], nf_grid()[:4], np.array([[1.0, 2, 1, 0.5], [1, 2, 1, 0.5]]),
                       np.array([[1.0, 1, 1, 3], [1, 1, 1, 3]]), np.ones(2))
    # column 1 is dominated by column 0; column 2 duplicates column 0; column 3 is dearer but better
    assert undominated(table) == [0, 3]


def test_allocation_meets_budget_and_is_reproducible(tmp_path):
    a = quantize_and_prepare(tiny_llama(), bits=3.0, rank=4, formats=SMALL_GRID, cache_dir=tmp_path, progress=False)
    b = quantize_and_prepare(tiny_llama(), bits=3.0, rank=4, formats=SMALL_GRID, cache_dir=False, progress=False)
    ra, rb = a.qft_report, b.qft_report
    assert ra.bits <= 3.0 and ra.bits > 2.5
    assert [m.format for m in ra.matrices] == [m.format for m in rb.matrices]
    assert len({m.format for m in ra.matrices}) > 1  # a mixed allocation
    assert ra.solution.gap < 1e-4 and ra.solution.status in ("optimal", "feasible")
    for (name, qa), (_, qb) in zip(a.named_modules(), b.named_modules()):
        if isinstance(qa, QLinear):
            assert torch.equal(qa.weight_codes, qb.weight_codes), name
            assert torch.equal(qa.lora_A, qb.lora_A) and torch.equal(qa.lora_B, qb.lora_B)
    assert list(tmp_path.glob("errors-*.safetensors"))  # the table was cached


def test_prepared_model_trains_only_low_rank_factors():
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
    quantize_and_prepare(model, bits="nf4", rank=8, progress=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QLinear)
    assert "lm_head" in model.qft_report.skipped
    logits = model(ids).logits
    assert (logits - reference).norm() / reference.norm() < 0.1  # 4-bit + rank 8 stays close (measured 0.053)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_methods_order_reconstruction_error():
    errors = {}
    for method in ("qlora", "loftq", "lqlora"):
        model = quantize_and_prepare(tiny_llama(), bits="nf2-b64-dq8b256", method=method, rank=8, progress=False)
        errors[method] = model.qft_report.total_error
    assert errors["lqlora"] <= errors["loftq"] < errors["qlora"]


def test_report_bits_are_real_bytes():
    model = quantize_and_prepare(tiny_llama(), bits="nf3-b64-dq8b256", rank=4, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    numel = sum(m.in_features * m.out_features for m in layers)
    quant = sum(m.weight.nbytes for m in layers) * 8
    low_rank = sum((m.lora_A.numel() + m.lora_B.numel()) * 4 for m in layers) * 8
    assert model.qft_report.bits == quant / numel
    assert model.qft_report.bits_with_adapters == (quant + low_rank) / numel


def test_unsupported_modules_are_listed_not_mangled():
    class Conv1DLike(nn.Module):  # e.g. GPT-2's Conv1D: a 2-D weight, not an nn.Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 96))

        def forward(self, x):
            return x @ self.weight

    model = tiny_llama()
    model.model.layers[0].mlp.extra = Conv1DLike()
    quantize_and_prepare(model, bits="nf4", rank=2, progress=False)
    assert model.qft_report.skipped["model.layers.0.mlp.extra"] == "unsupported module type Conv1DLike"
    assert isinstance(model.model.layers[0].mlp.extra, Conv1DLike)


def test_bad_input():
    with pytest.raises(ValueError, match=r"budget 1.5000 bits/param is outside the feasible range \[2\.\d+, \d+\.\d+\] bits/param"):
        quantize_and_prepare(tiny_llama(), bits=1.5, rank=4, formats=SMALL_GRID, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        quantize_and_prepare(tiny_llama(), method="gptq")
    with pytest.raises(ValueError, match="unknown format"):
        quantize_and_prepare(tiny_llama(), bits="q9_9")
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="k_proj.weight holds NaN"):
        quantize_and_prepare(model, bits="nf4")
    with pytest.raises(ValueError, match="fisher=True needs a tokenizer"):
        quantize_and_prepare(tiny_llama(), fisher=True)


def test_fisher_weights_the_allocation_and_the_decomposition():
    from qft.prepare.fisher import empirical_fisher

    reference = tiny_llama()
    targets = qft.find_target_linears(reference)
    fisher = empirical_fisher(reference, Chars(), targets, CALIBRATION, progress=False)
    model = quantize_and_prepare(tiny_llama(), bits=3.0, rank=4, fisher=True, tokenizer=Chars(),
                                 calibration=CALIBRATION, formats=SMALL_GRID, cache_dir=False, progress=False)
    report = model.qft_report
    assert report.fisher and report.bits <= 3.0
    # the allocation minimised the Fisher-weighted error table, not the plain one
    weights = {n: m.weight.detach() for n, m in targets.items()}
    grid = pruned_grid(weights, 4, fisher=fisher, formats=SMALL_GRID, cache_dir=False, progress=False)
    table = error_table(weights, grid, 4, fisher=fisher, cache_dir=False, progress=False)
    chosen = table.errors[range(len(weights)), report.solution.choice]
    assert report.solution.objective == pytest.approx(chosen.sum(), rel=1e-9)
    assert [m.format for m in report.matrices] == [grid[c].name for c in report.solution.choice]
    # each decomposition minimised Σ F (W − Ŵ)², which the report keeps as its objective
    for m in report.matrices:
        layer = model.get_submodule(m.name)
        rebuilt = layer.weight.dequantize() + layer.scaling * layer.lora_B @ layer.lora_A
        weighted = float((fisher[m.name] * (weights[m.name] - rebuilt.detach()) ** 2).sum())
        assert m.objective == pytest.approx(weighted, rel=1e-4) and m.objective != pytest.approx(m.error, rel=0.1)


def test_heatmap(tmp_path):
    model = quantize_and_prepare(tiny_llama(), bits=2.75, rank=4, formats=SMALL_GRID, cache_dir=False, progress=False)
    path = bits_heatmap(model.qft_report, tmp_path / "bits.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_error_table_is_cached(tmp_path, monkeypatch):
    import qft.prepare.allocate

    weights = {"a": torch.randn(32, 64), "b": torch.randn(16, 64)}
    first = error_table(weights, nf_grid()[:5], 4, cache_dir=tmp_path, progress=False)
    (cached,) = tmp_path.glob("*.safetensors")
    with monkeypatch.context() as m:  # the second call must read the file, not compute anything
        m.setattr(qft.prepare.allocate, "_errors", lambda *args: pytest.fail("the cached table was not read"))
        again = error_table(weights, nf_grid()[:5], 4, cache_dir=tmp_path, progress=False)
    assert (first.errors == again.errors).all()
    other = error_table({**weights, "b": weights["b"] + 1e-3}, nf_grid()[:5], 4, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not (other.errors == first.errors).all()
    formats, solution = allocate(first, 3.0)
    assert len(formats) == 2 and solution.cost <= 3.0 * first.numel.sum()


def test_fisher_ignores_and_keeps_existing_gradients():
    from qft.prepare.fisher import empirical_fisher

    class Chars:  # a character-level tokenizer for the tiny model
        eos_token = None

        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 300 for c in text]])})()

    model = tiny_llama()
    targets = qft.find_target_linears(model)
    texts = ["some calibration text " * 20]
    clean = empirical_fisher(model, Chars(), targets, texts, block_size=32, progress=False)
    first = next(iter(targets.values())).weight
    first.grad = torch.ones_like(first)
    with torch.no_grad():
        again = empirical_fisher(model, Chars(), targets, texts, block_size=32, progress=False)
    assert all(torch.allclose(clean[n], again[n]) for n in clean)
    assert torch.equal(first.grad, torch.ones_like(first))  # the user's gradient is back
    assert all(f.shape == targets[n].weight.shape and (f >= 0).all() and f.sum() > 0 for n, f in clean.items())


def test_qlora_draws_every_layer_from_one_stream():
    model = quantize_and_prepare(tiny_llama(), bits="nf4", method="qlora", rank=4, seed=5, progress=False)
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q.lora_A.shape == k.lora_A.shape and not torch.equal(q.lora_A, k.lora_A)
    again = quantize_and_prepare(tiny_llama(), bits="nf4", method="qlora", rank=4, seed=5, progress=False)
    assert torch.equal(again.model.layers[1].self_attn.q_proj.lora_A, k.lora_A)


def test_an_already_prepared_model_is_refused_clearly():
    model = quantize_and_prepare(tiny_llama(), bits="nf4", method="qlora", rank=2, progress=False)
    with pytest.raises(ValueError, match="already prepared by qft"):
        quantize_and_prepare(model, bits="nf4")
    halo = quantize_and_prepare(tiny_llama(), method="halo", progress=False)
    with pytest.raises(ValueError, match="already prepared by qft"):
        quantize_and_prepare(halo, bits="nf4")


def _state(model: nn.Module, ids: torch.Tensor) -> tuple:
    """What a failed preparation must leave as it was: module types, weights, mode, logits."""
    with torch.no_grad():
        logits = model(ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return [type(m) for m in model.modules()], weights, model.training, logits


def _huge_weight(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # the last matrix: int-k's fp16 scales cannot span it
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e8
    return model


@pytest.mark.parametrize("case", ["rank above a GQA k_proj", "int4 fp16 scale overflow", "the same under GPTQ",
                                  "halo width it cannot rotate"])
def test_a_late_error_leaves_the_model_untouched_and_a_retry_works(case):
    model = tiny_llama()
    if case == "rank above a GQA k_proj":  # k_proj is (32, 64): after q_proj (64, 64) in module order
        bad, match, good = dict(bits="nf4", rank=48), r"rank 48 is above .*k_proj \(32, 64\)", dict(bits="nf4", rank=8)
    elif case == "halo width it cannot rotate":
        model.model.layers[1].mlp.extra = nn.Linear(52, 8)  # the last target; 52 has no Hadamard matrix
        bad, match, good = dict(method="halo", level=1), "nearest supported sizes", dict(method="halo", level=0)
    else:
        _huge_weight(model)
        bad = dict(bits="int4", method="qlora", rank=4)
        if case == "the same under GPTQ":
            bad.update(rounding="gptq", tokenizer=Chars(), calibration=CALIBRATION)
        match = r"layers\.1\.mlp\.down_proj \(int4-g128\): int4-g128 stores scales in fp16"
        good = dict(bits="nf4", method="qlora", rank=4)
    model.train()  # GPTQ calibrates in eval mode: the mode must come back too
    targets = len(qft.find_target_linears(model))
    ids = torch.randint(0, 300, (2, 12))
    types, weights, training, logits = _state(model, ids)
    with pytest.raises(ValueError, match=match):
        quantize_and_prepare(model, progress=False, **bad)
    assert not hasattr(model, "qft_report") and model.training == training
    after_types, after_weights, _, after_logits = _state(model, ids)
    assert after_types == types and weights.keys() == after_weights.keys()
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    assert torch.equal(logits, after_logits)
    quantize_and_prepare(model, progress=False, **good)
    assert len(model.qft_report.matrices) == targets


def test_meta_weights_are_refused_clearly():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        quantize_and_prepare(model, bits="nf4")


def test_a_budget_above_every_candidate_says_what_was_done(caplog):
    model = quantize_and_prepare(tiny_llama(), bits=12, rank=4, formats=SMALL_GRID, cache_dir=False, progress=False)
    report = model.qft_report
    assert "above the dearest candidate" in report.summary() and "above the dearest" in caplog.text
    assert all(m.format.startswith("nf8") for m in report.matrices) and report.bits <= 10.0


def test_skip_modules_replace_the_default_and_match_whole_names():
    model = tiny_llama()
    model.model.layers[0].mlp.embed_proj = nn.Linear(64, 64)  # "embed" in its name, yet a projection
    quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    assert isinstance(model.model.layers[0].mlp.embed_proj, QLinear)
    assert not isinstance(model.lm_head, QLinear) and "lm_head" in model.qft_report.skipped
    model = quantize_and_prepare(tiny_llama(), bits="nf4", method="qlora", rank=2, skip_modules=["down_proj"],
                                 progress=False)
    assert isinstance(model.lm_head, QLinear) and not isinstance(model.model.layers[0].mlp.down_proj, QLinear)


def test_a_layer_the_fisher_never_reaches_is_named():
    from qft.prepare.fisher import empirical_fisher

    class Chars:
        eos_token = None

        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 300 for c in text]])})()

    model = tiny_llama()
    model.model.layers[0].mlp.unused = nn.Linear(64, 64)
    targets = qft.find_target_linears(model)
    with pytest.raises(ValueError, match=r"never uses \['model.layers.0.mlp.unused'\]"):
        empirical_fisher(model, Chars(), targets, ["some text " * 20], block_size=32, progress=False)


def test_a_shared_layer_is_quantized_once_and_stays_shared(tmp_path):
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight  # tied weights
    quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    first, second = model.model.layers[0].mlp.up_proj, model.model.layers[1].mlp.up_proj
    assert first is second and model.qft_report.tied == {"model.layers.1.mlp.up_proj": "model.layers.0.mlp.up_proj"}
    assert len(model.qft_report.matrices) == 13
    with torch.no_grad():
        first.lora_B.normal_()
    qft.save_quantized(model, tmp_path / "ckpt")
    loaded = qft.load_quantized(tmp_path / "ckpt")
    assert loaded.model.layers[0].mlp.up_proj is loaded.model.layers[1].mlp.up_proj
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_registered_method_is_dispatched_to():
    from qft.methods import METHODS, Built

    calls = []

    @qft.register_method("rtn-test", needs_rank=False, table_rank=lambda rank: 0)
    def rtn(w, bias, fmt, options):
        calls.append(fmt.name)
        qweight = qft.QuantizedTensor.quantize(w, fmt, options.dtype)
        return Built(QLinear(qweight, bias), float(((w - qweight.dequantize(torch.float32)) ** 2).sum()))

    try:
        model = quantize_and_prepare(tiny_llama(), bits="int4", method="rtn-test", rank=0, progress=False)
    finally:
        del METHODS["rtn-test"]
    assert calls == ["int4-g128"] * 14 and model.qft_report.method == "rtn-test"
    assert not any(p.requires_grad for p in model.parameters())  # nothing to train: no adapters


def test_a_table_of_rows_with_different_columns_leaves_missing_cells_empty():
    from qft.prepare.report import markdown_table

    table = markdown_table([{"run": "fp32", "ppl": 12.5}, {"run": "int2", "ppl": 3.0, "s/step": 1.25}], ".2f")
    assert table.splitlines() == ["| run | ppl | s/step |", "|---|---|---|", "| fp32 | 12.50 |  |", "| int2 | 3.00 | 1.25 |"]


def test_a_model_that_is_not_a_transformers_model_is_prepared_and_left_unmarked():
    """Only transformers models are marked for save_pretrained; a bare stack with a config of its own keeps it."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    model.config = {"width": 64}
    quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    assert isinstance(model[0], QLinear) and model.config == {"width": 64}
    assert not hasattr(model, "hf_quantizer")
    tiny = quantize_and_prepare(tiny_llama(), bits="nf4", method="qlora", rank=2, progress=False)
    assert tiny.config.quantization_config.quant_method == "qft" and tiny.is_quantized


@pytest.mark.parametrize("method, format", [("qlora", "nf4"), ("loftq", "nf4"), ("qalora", "q4_1"),
                                            ("peqa", "int4-ch"), ("int21", "int2-g128")])
def test_each_method_without_bits_takes_its_own_default(method, format):
    """Only LQ-LoRA spends a budget by default; QLoRA without bits= is NF4, as users of QLoRA expect."""
    kwargs = {"rank": 4} if method != "peqa" else {}
    if method == "int21":
        kwargs["rounding"] = "rtn"  # its GPTQ default reads calibration text
    model = quantize_and_prepare(tiny_llama(), method=method, fisher=False, progress=False, **kwargs)
    assert {m.format for m in model.qft_report.matrices} == {get_format(format).name}
