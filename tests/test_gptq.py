"""GPTQ rounding: equal to RTN under H = I, better than RTN on real activations, layer by layer."""

import pytest
import torch
from torch import nn
from conftest import ALL_FORMATS
from helpers import CALIBRATION as TEXTS
from helpers import Chars, tiny_llama

import qft
from qft.methods.gptq import LayerwiseHessians, gptq, output_error
from qft.methods.lqlora import lqlora
from qft.quant.tensor import QuantizedTensor


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_identity_hessian_gives_round_to_nearest(name, rng):
    w = torch.randn(24, 256, generator=rng)
    rtn = QuantizedTensor.quantize(w, name)
    same = gptq(w, name, torch.eye(256), damp=0.0)
    assert torch.equal(same.dequantize(), rtn.dequantize())  # FP8's −0 and +0 codes mean the same value
    if not name.startswith("fp8"):
        assert torch.equal(same.codes, rtn.codes)


def test_correlated_inputs_gptq_beats_rtn_and_keeps_scales(rng):
    w = torch.randn(64, 256, generator=rng)
    x = torch.randn(1024, 256, generator=rng) @ torch.randn(256, 256, generator=rng)
    h = x.t() @ x / len(x)
    for name in ("int2-g128", "nf3-b32-dq8b256", "int4-ch"):
        rtn, g = QuantizedTensor.quantize(w, name), gptq(w, name, h)
        assert all(torch.equal(g.tensors[k], rtn.tensors[k]) for k in rtn.tensors)  # static groups
        assert not torch.equal(g.codes, rtn.codes)
        assert output_error(w, g.dequantize(), h) < 0.8 * output_error(w, rtn.dequantize(), h)
        ordered = gptq(w, name, h, act_order=True)
        assert output_error(w, ordered.dequantize(), h) < output_error(w, rtn.dequantize(), h)


def test_gptq_beats_rtn_on_a_real_layer():
    model, tokenizer = qft.default_model(progress=False)
    names = [n for n in qft.find_target_linears(model) if n.startswith("model.layers.3.")]
    corpus = qft.default_corpus()
    # 16k calibration tokens: with much fewer, down_proj's 1536 x 1536 Hessian is fitted to its text
    calibration = LayerwiseHessians(model, tokenizer, names, corpus["train"]["text"], max_blocks=32, progress=False)
    heldout = LayerwiseHessians(model, tokenizer, names, corpus["test"]["text"], progress=False)
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        w = model.get_submodule(name).weight.detach()
        h, h_test = calibration.hessian(name), heldout.hessian(name)
        for fmt in ("int2-g128", "int3-g64", "nf3-b64"):
            rtn, g = QuantizedTensor.quantize(w, fmt).dequantize(), gptq(w, fmt, h).dequantize()
            assert output_error(w, g, h) < 0.6 * output_error(w, rtn, h)
            assert output_error(w, g, h_test) < 0.85 * output_error(w, rtn, h_test)  # and on text it never saw


def _hooked_hessian(model, name, blocks):
    """H of ``name`` from plain full-model forwards: the reference."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in blocks.split(4):
            model(input_ids=b)
    handle.remove()
    x = torch.cat(seen)
    return x.t() @ x / len(x)


def test_each_layer_sees_the_layers_before_it_as_they_are_now():
    from qft.files.data import token_blocks

    model = tiny_llama()
    names = list(qft.find_target_linears(model))
    blocks = token_blocks(Chars(), TEXTS, 64)[:16]
    hessians = LayerwiseHessians(model, Chars(), names, TEXTS, block_size=64, max_blocks=16, progress=False)
    first = "model.layers.0.mlp.down_proj"
    assert torch.allclose(hessians.hessian(first), _hooked_hessian(model, first, blocks), rtol=1e-4, atol=1e-6)
    later = "model.layers.1.self_attn.q_proj"
    untouched = _hooked_hessian(model, later, blocks)
    with torch.no_grad():  # what quantizing layer 0 does: its weights change before layer 1 is asked for
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    changed = _hooked_hessian(model, later, blocks)
    h = hessians.hessian(later)
    assert torch.allclose(h, changed, rtol=1e-4, atol=1e-6) and not torch.allclose(h, untouched, rtol=1e-2)
    with pytest.raises(ValueError, match="already calibrated"):
        hessians.hessian(first)


def test_prepare_with_gptq_rounding_lowers_the_output_error():
    from qft.files.data import token_blocks

    ids = token_blocks(Chars(), TEXTS, 64)
    reference = tiny_llama()
    with torch.no_grad():
        target = reference(input_ids=ids).logits
    errors = {}
    for rounding in ("rtn", "gptq"):
        model = qft.quantize_and_prepare(tiny_llama(), bits="int2-g32", method="qlora", rank=0, rounding=rounding,
                                         tokenizer=Chars(), calibration=TEXTS, progress=False)
        assert model.qft_report.rounding == rounding and not model.training
        with torch.no_grad():
            errors[rounding] = float(((model(input_ids=ids).logits - target) ** 2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_lqlora_with_a_hessian_lowers_its_output_error(rng):
    w = torch.randn(64, 128, generator=rng)
    x = torch.randn(512, 128, generator=rng) @ torch.randn(128, 128, generator=rng)
    h = x.t() @ x / len(x)
    plain, aware = lqlora(w, "nf2-b32", 8, iters=3), lqlora(w, "nf2-b32", 8, iters=3, hessian=h)

    def out(d):
        return output_error(w, d.qweight.dequantize() + d.L1 @ d.L2, h)

    assert out(aware) < out(plain) and aware.error == pytest.approx(out(aware), rel=1e-3)


def test_int21_is_a_gptq_int2_base_with_paper_lora():
    model = qft.quantize_and_prepare(tiny_llama(), bits=2, method="int21", tokenizer=Chars(), calibration=TEXTS,
                                     progress=False)
    report = model.qft_report
    assert report.rounding == "gptq" and report.rank == 32
    assert {m.format for m in report.matrices} == {"int2-g128"}
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling == 4.0 and torch.count_nonzero(layer.lora_B) == 0
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_bad_rounding_requests_are_refused():
    with pytest.raises(ValueError, match="unsupported rounding 'awq'"):
        qft.quantize_and_prepare(tiny_llama(), bits="nf4", rounding="awq", progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        qft.quantize_and_prepare(tiny_llama(), bits="nf4", rounding="gptq", progress=False)
    with pytest.raises(ValueError, match="lie outside the model's list of decoder layers"):
        qft.quantize_and_prepare(tiny_llama(), bits="nf4", method="qlora", rank=0, rounding="gptq", skip_modules=[],
                                 tokenizer=Chars(), calibration=TEXTS, progress=False)
    with pytest.raises(ValueError, match=r"Hessian must be \(64, 64\)"):
        gptq(torch.randn(8, 64), "int4-g32", torch.eye(32))


def test_stand_ins_are_calibrated_on_and_the_model_keeps_its_own_layers():
    from qft.files.data import token_blocks
    from qft.nn.targets import set_module

    model = tiny_llama()
    names = list(qft.find_target_linears(model))
    blocks = token_blocks(Chars(), TEXTS, 64)[:16]
    first, later = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"
    original = model.get_submodule(first)
    stand_in = nn.Linear(96, 64, bias=False)
    stand_in.weight.data = 3 * original.weight.detach()  # what the caller built for it, not yet swapped in
    hessians = LayerwiseHessians(model, Chars(), names, TEXTS, block_size=64, max_blocks=16, progress=False,
                                 stand_ins={first: stand_in})
    hessians.hessian(first)
    h = hessians.hessian(later)
    assert model.get_submodule(first) is original
    set_module(model, first, stand_in)
    assert torch.allclose(h, _hooked_hessian(model, later, blocks), rtol=1e-4, atol=1e-6)


def test_the_report_gives_the_frobenius_error_of_the_initial_weight_under_gptq():
    model = qft.quantize_and_prepare(tiny_llama(), bits="nf3-b32", method="lqlora", rank=4, alpha=16, iters=2,
                                     rounding="gptq", tokenizer=Chars(), calibration=TEXTS, progress=False)
    report, original = model.qft_report, tiny_llama()
    for m in report.matrices:
        layer, w = model.get_submodule(m.name), original.get_submodule(m.name).weight.detach()
        approx = layer.weight.dequantize() + layer.scaling * (layer.lora_B @ layer.lora_A).detach()
        assert layer.scaling == 4.0
        assert m.relative_error == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-4)
        assert m.error == pytest.approx(float(((w - approx) ** 2).sum()), rel=1e-4)
        assert m.objective != pytest.approx(m.error, rel=0.01)  # GPTQ's output error, kept apart
    assert report.total_error == pytest.approx(sum(m.error for m in report.matrices))
