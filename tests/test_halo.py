"""HALO: low-precision matmuls (kernels/low_precision.py), HaloLinear's three products per level, the method,
training and checkpoints."""

import pytest
import torch
from helpers import tiny_llama

import qft
from qft.kernels import low_precision
from qft.kernels.low_precision import quantize, scaled_matmul
from qft.nn import HaloLinear, HaloSettings, QLinear
from qft.nn import halo as halo_module

# relative error of one product against fp32, on Gaussian operands: E4M3 keeps 3 mantissa bits
# (≈ 3.7 % measured), int8 ≈ 1 %; both well under these bounds, and a wrong scale or transpose far over.
TOLERANCE = {"fp8": 0.06, "int8": 0.03}


def rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_uses_the_whole_range_and_the_fast_product_equals_the_emulated_one(precision, granularity,
                                                                                    monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 96, generator=gen), torch.randn(24, 96, generator=gen)
    qa, sa = quantize(a, precision, granularity)
    top = 448.0 if precision == "fp8" else 127.0
    peak = qa.float().abs().amax() if granularity == "tensor" else qa.float().abs().amax(dim=1)
    assert torch.all(peak == top)  # the absmax lands on the format's largest value
    assert qa.dtype == (torch.float8_e4m3fn if precision == "fp8" else torch.int8)
    qb, sb = quantize(b, precision, granularity)
    emulated = (qa.float() * sa) @ (qb.float() * sb).t()
    torch.testing.assert_close(scaled_matmul(qa, sa, qb, sb), emulated, rtol=1e-5, atol=1e-4)  # CPU: emulated
    calls = []
    for name, op in (("_scaled_mm", torch._scaled_mm), ("_int_mm", torch._int_mm)):  # CUDA's kernels, run here
        monkeypatch.setattr(torch, name, lambda *x, op=op, **k: calls.append(op) or op(*x, **k))
    monkeypatch.setattr(low_precision, "_fast_fp8", lambda a, b: True)
    monkeypatch.setattr(low_precision, "_fast_int8", lambda a, b: True)
    fast = scaled_matmul(qa, sa, qb, sb)
    assert len(calls) == 1
    bf16_out = precision == "fp8" and granularity == "row"  # as CUDA writes row-scaled FP8 products
    torch.testing.assert_close(fast, emulated, rtol=1e-2 if bf16_out else 1e-5, atol=1e-4)
    assert rel(fast, a @ b.t()) < TOLERANCE[precision]


def test_e5m2_gradients_and_bad_choices():
    x = torch.randn(8, 32) * 1e4
    codes, scale = quantize(x, "fp8", fp8="e5m2")
    assert codes.dtype == torch.float8_e5m2 and float(codes.float().abs().max()) == 57344.0
    with pytest.raises(ValueError, match="unknown precision"):
        quantize(x, "fp4")
    with pytest.raises(ValueError, match="granularity"):
        quantize(x, "fp8", "block")
    with pytest.raises(ValueError, match="level"):
        HaloSettings(level=3)


def _exact(monkeypatch):
    """Products in plain fp32: what is left of HALO is its rotations, which must cancel."""
    monkeypatch.setattr(halo_module, "low_precision_matmul", lambda a, b, *args, **kwargs: a.float() @ b.float().t())


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("tokens", [64, 50])  # 50: no Hadamard matrix; the token rotation pads to 56
def test_the_rotations_cancel_exactly_in_fp32(level, tokens, monkeypatch):
    _exact(monkeypatch)
    gen = torch.Generator().manual_seed(level)
    x, w, g = torch.randn(tokens, 192, generator=gen), torch.randn(48, 192, generator=gen), torch.randn(tokens, 48,
                                                                                                        generator=gen)
    layer = HaloLinear(w, None, settings=HaloSettings(level=level))
    xx = x.clone().requires_grad_()
    layer(xx).backward(g)
    torch.testing.assert_close(layer(x), x @ w.t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xx.grad, g @ w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, g.t() @ x, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_rotations_and_products_stay_float32(peft, dtype):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 192, generator=gen) * 0.05  # 192 = 12·16: the rotation has a matmul autocast would take
    x, g = torch.randn(50, 192, generator=gen).to(dtype), torch.randn(50, 48, generator=gen).to(torch.bfloat16)
    layer = HaloLinear(w, None, settings=HaloSettings(level=2), peft=peft, rank=4 if peft else 0)  # LoRA B = 0
    xx, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xx)
        y.backward(g)
    reference = layer(x32)  # the same computation in float32, no autocast, cast to bf16 at the end
    reference.backward(g.float())
    assert y.dtype == torch.bfloat16 and torch.equal(y, reference.to(torch.bfloat16))
    assert xx.grad.dtype == dtype and torch.equal(xx.grad, x32.grad.to(dtype))


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_gradients_match_autograd_within_the_formats_tolerance(precision, level):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 576, generator=gen)
    w, bias = torch.randn(192, 576, generator=gen) * 0.05, torch.randn(192, generator=gen)
    g = torch.randn(2, 32, 192, generator=gen)
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
    (xr @ wr.t() + br).backward(g)
    layer = HaloLinear(w, bias, settings=HaloSettings(level, precision))
    xx = x.clone().requires_grad_()
    y = layer(xx)
    y.backward(g)
    assert y.shape == (2, 32, 192)
    for ours, reference in ((y, x @ w.t() + bias), (xx.grad, xr.grad), (layer.weight.grad, wr.grad)):
        assert rel(ours, reference) < TOLERANCE[precision]
    torch.testing.assert_close(layer.bias.grad, br.grad)


def test_rotation_spreads_an_outlier_channel_for_int8():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 576, generator=gen)
    x[:, 7] *= 50  # one activation channel 50x the rest, as LLM activations have
    w, g = torch.randn(192, 576, generator=gen) * 0.05, torch.randn(64, 192, generator=gen)
    errors = {}
    for level in (0, 1):
        layer = HaloLinear(w, None, settings=HaloSettings(level, "int8"))
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.backward(g)
        errors[level] = (rel(y, x @ w.t()), rel(layer.weight.grad, g.t() @ x))
    assert errors[1][0] < 0.3 * errors[0][0] and errors[1][1] < 0.3 * errors[0][1]


def test_level_2_spreads_an_outlier_token_of_the_gradient():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(64, 576, generator=gen), torch.randn(192, 576, generator=gen) * 0.05
    g = torch.randn(64, 192, generator=gen)
    g[5] *= 100  # one token's gradient dominates
    errors = {}
    for level in (1, 2):
        xx = x.clone().requires_grad_()
        HaloLinear(w, None, settings=HaloSettings(level, "int8"))(xx).backward(g)
        errors[level] = rel(xx.grad, g @ w)
    assert errors[2] < 0.5 * errors[1]


def test_an_unrotatable_width_is_refused_with_the_nearest_sizes():
    with pytest.raises(ValueError, match="nearest supported sizes"):
        HaloLinear(torch.randn(8, 52), None, settings=HaloSettings(level=1))
    HaloLinear(torch.randn(8, 52), None, settings=HaloSettings(level=0))  # level 0 rotates nothing


def test_the_method_swaps_every_projection_and_trains_only_their_weights():
    model = tiny_llama()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        reference = model(x).logits
    qft.quantize_and_prepare(model, method="halo", level=2, precision="int8", progress=False)
    layers = [m for m in model.modules() if isinstance(m, HaloLinear)]
    assert len(layers) == 14 and not any(isinstance(m, QLinear) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{p}.weight" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    with torch.no_grad():
        assert rel(model(x).logits, reference) < 0.05
    assert model.qft_report.method == "halo" and model.qft_report.bits == 32.0
    with pytest.raises(ValueError, match="unexpected option"):
        qft.quantize_and_prepare(tiny_llama(), method="halo", levle=2)
    with pytest.raises(ValueError, match="takes none"):
        qft.quantize_and_prepare(tiny_llama(), method="qlora", level=2)
    with pytest.raises(ValueError, match="no bit budget"):
        qft.quantize_and_prepare(tiny_llama(), method="halo", rounding="gptq")
    with pytest.raises(ValueError, match=r"drop \['calibration'\]"):
        qft.quantize_(tiny_llama(), qft.HALOConfig(), calibration=["some text"])
    with pytest.raises(ValueError, match=r"drop \['bits'\]"):  # HALO has no bit width to take
        qft.quantize_and_prepare(tiny_llama(), method="halo", bits=2.5)
    with pytest.raises(ValueError, match="peft=True"):
        qft.quantize_and_prepare(tiny_llama(), method="halo", rank=8)


@pytest.mark.parametrize("precision, dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_halo_peft_freezes_an_8_bit_base_and_trains_lora(precision, dtype):
    model = qft.quantize_and_prepare(tiny_llama(), method="halo", peft=True, precision=precision, rank=4,
                                     progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight_codes.dtype == dtype and layer.rank == 4 and layer.scaling == 1.0
    assert {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert 8 < model.qft_report.bits < 8.1  # the codes and one fp32 scale per matrix
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():  # B = 0: the layer is its 8-bit base
        torch.testing.assert_close(layer(x), x @ layer.base_weight().t(), rtol=0.05, atol=0.05)
    xx, g = x.clone().requires_grad_(), torch.randn(3, layer.out_features)
    layer(xx).backward(g)  # the input gradient goes through the frozen 8-bit base, dequantized per product
    assert rel(xx.grad, g @ layer.base_weight()) < TOLERANCE[precision]
    assert layer.lora_B.grad is not None and not layer.lora_B.grad.eq(0).all()
    codes, scale = layer.weight_codes.clone(), layer.weight_scale.clone()
    model.to(torch.bfloat16)  # a cast of the model leaves the stored base exactly as it was
    assert torch.equal(layer.weight_codes.float(), codes.float()) and layer.weight_codes.dtype == dtype
    assert torch.equal(layer.weight_scale, scale) and layer.lora_A.dtype == torch.bfloat16
    assert model(torch.randint(0, 300, (1, 8))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_inference_casts_the_weight_once_and_again_after_it_changes(granularity, monkeypatch):
    layer = HaloLinear(torch.randn(24, 32), settings=HaloSettings(2, "fp8", granularity))
    x = torch.randn(5, 32)
    trained = layer(x)  # grad enabled: the weight is rotated and cast inside the product
    casts = []
    monkeypatch.setattr(halo_module, "quantize", lambda *a, **k: casts.append(a[0].shape) or quantize(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), trained.detach(), rtol=1e-6, atol=1e-6)
        layer(x)
    assert casts == [(24, 32), (5, 32), (5, 32)]  # the weight once, x each call
    trained.sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, trained)  # the step changed the weight: the cast was redone
    torch.testing.assert_close(after, layer(x).detach(), rtol=1e-6, atol=1e-6)
    assert layer._cast is None  # a forward with gradients drops the cached copy
    with torch.no_grad():
        layer(x)
        layer.load_state_dict({"weight": torch.randn(24, 32)})  # a load writes into the weight: cast again
        assert rel(layer(x), x @ layer.weight.t()) < TOLERANCE["fp8"]


@pytest.mark.parametrize("options", [dict(level=2, precision="fp8"), dict(level=1, precision="int8", peft=True)])
def test_training_works_unchanged_and_the_checkpoint_reloads_identically(options, tmp_path):
    model = qft.quantize_and_prepare(tiny_llama(), method="halo", progress=False, **options)
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 300, (4, 16), generator=gen)
    result = qft.train(model, None, blocks, blocks[:2], progress=False, steps=20, batch_size=2, block_size=16,
                       lr=2e-2, warmup=2, seed=0)
    assert result.losses[-1] < result.losses[0] - 0.5
    qft.save_quantized(model, tmp_path / "ckpt")
    loaded = qft.load_quantized(tmp_path / "ckpt")
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft", [False, True])
def test_a_halo_model_exports_dense_and_merged_int4(peft, tmp_path):
    from qft.exports.merged import export_dense, export_merged, load_merged
    from transformers import AutoModelForCausalLM

    model = qft.quantize_and_prepare(tiny_llama(), method="halo", peft=peft, level=1, progress=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, HaloLinear) and peft:
                layer.lora_B.normal_(0, 0.02)  # a trained adapter, so the merge has something to add
    export_dense(model, tmp_path / "dense", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for name, layer in model.named_modules():
        if isinstance(layer, HaloLinear):
            assert torch.equal(dense.get_submodule(name).weight, layer.merged_weight())
    export_merged(model, tmp_path / "int4", dtype=torch.float32)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        reference = dense(x).logits
        assert rel(load_merged(tmp_path / "int4")(x).logits, reference) < 0.2  # int4 of a random model
