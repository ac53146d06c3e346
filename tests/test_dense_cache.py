import pytest
import torch
from helpers import tiny_llama

import qft
from qft.nn import QLinear


def _quantized(**kwargs):
    model = tiny_llama()
    return qft.quantize_and_prepare(model, bits="nf3-b32", method="qlora", rank=4, progress=False, **kwargs)


def test_cached_logits_equal_the_quantized_path():
    model = _quantized()
    for layer in model.modules():
        if isinstance(layer, QLinear):
            torch.nn.init.normal_(layer.lora_B)  # a live adapter, so it takes part too
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        plain = model(ids).logits
        with qft.dense_weights(model) as held:
            cached = model(ids).logits
            greedy = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        after = model(ids).logits
    assert torch.equal(cached, plain)
    assert torch.equal(after, plain)
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), greedy)
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    assert held == sum(m.in_features * m.out_features * 4 for m in layers)
    assert all(m.dense_cache is None for m in layers)


def test_cache_is_freed_on_error_and_tied_layers_counted_once():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[1].mlp.gate_proj.weight  # tie two targets
    qft.quantize_and_prepare(model, bits="nf4", method="qlora", rank=2, progress=False)
    layers = {id(m): m for m in model.modules() if isinstance(m, QLinear)}.values()
    with pytest.raises(RuntimeError, match="boom"):
        with qft.dense_weights(model, dtype=torch.bfloat16) as held:
            assert held == sum(m.in_features * m.out_features * 2 for m in layers)
            raise RuntimeError("boom")
    assert all(m.dense_cache is None for m in layers)


def test_forward_with_grad_ignores_the_cache():
    # a trainable scale must keep receiving gradients: only no-grad forwards read the cache
    layer = QLinear.from_linear(torch.nn.Linear(32, 8), "int4-g16", train_scales=True)
    x = torch.randn(3, 32)
    with qft.dense_weights(layer):
        layer.dense_cache.zero_()  # a stale cache would show in the output
        layer(x).sum().backward()
        with torch.no_grad():
            assert torch.equal(layer(x), layer.bias.expand(3, 8))
    assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0
