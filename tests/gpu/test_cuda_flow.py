"""The README's whole flow on a CUDA device. Skipped without one (run it with `pytest tests/gpu`).

Every tensor qft makes must be made on its inputs' device: each step here runs with the model
on the GPU and checks where its results live.
"""

import subprocess
import sys

import pytest
import torch
from helpers import SMALL_GRID, tiny_llama
from transformers import AutoModelForCausalLM

import qft
from qft.nn import QLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def ids(seed=0, n=2, length=16):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed)).to(CUDA)


def layers(model):
    return [m for m in model.modules() if isinstance(m, QLinear)]


@pytest.mark.parametrize("method, bits", [("lqlora", 3.0), ("loftq", "nf3-b64-dq8b256"), ("qlora", "int4-g64")])
def test_quantize_on_the_gpu(method, bits, tmp_path):
    """Everything made on the GPU, and the same model as on the CPU: the same formats chosen, and
    each weight Q + scaling·BA within a small distance of the CPU's (GPU and CPU SVDs and matmuls
    round differently, so codes near a rounding boundary may differ; bit equality is not expected)."""
    made = {}
    for key, device in (("cpu", torch.device("cpu")), ("cuda", CUDA)):
        model = tiny_llama().to(device)
        qft.quantize_and_prepare(model, bits=bits, method=method, rank=4, formats=SMALL_GRID,
                                 cache_dir=tmp_path / key, progress=False)
        made[key] = model
    gpu, cpu = made["cuda"], made["cpu"]
    for layer in layers(gpu):
        assert layer.weight.device.type == "cuda" and layer.weight.codes.is_cuda and layer.lora_A.is_cuda
    assert [g.format.name for g in layers(gpu)] == [c.format.name for c in layers(cpu)]
    for g, c in zip(layers(gpu), layers(cpu)):
        w_gpu, w_cpu = g.merged_weight().cpu(), c.merged_weight()
        assert float((w_gpu - w_cpu).norm() / w_cpu.norm()) < 2e-2
    with torch.no_grad():
        logits_gpu, logits_cpu = gpu(ids()).logits.cpu(), cpu(ids().cpu()).logits
    assert torch.isfinite(logits_gpu).all()
    assert float((logits_gpu - logits_cpu).norm() / logits_cpu.norm()) < 2e-2


def test_fisher_weighted_lqlora_on_the_gpu(tmp_path):
    from transformers import AutoTokenizer

    from qft.files.models import DEFAULT_GGUF, default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.to(CUDA)
    texts = qft.default_corpus()["train"]["text"][:3]
    qft.quantize_and_prepare(model, bits=3.0, rank=4, fisher=True, tokenizer=tokenizer, calibration=texts,
                             formats=SMALL_GRID, cache_dir=tmp_path, progress=False)
    assert model.qft_report.bits <= 3.0 and all(layer.weight.is_cuda for layer in layers(model))


def test_triton_matches_torch_under_autocast():
    model = qft.quantize_and_prepare(tiny_llama().to(CUDA), bits="nf4", method="qlora", rank=4, progress=False)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(8, layer.in_features, device=CUDA, requires_grad=True)
    outputs = {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (grad,) = torch.autograd.grad(y.float().pow(2).sum(), x)
        outputs[backend] = (y, grad)
    (y_torch, g_torch), (y_triton, g_triton) = outputs["torch"], outputs["triton"]
    assert y_torch.dtype == y_triton.dtype == torch.bfloat16
    assert torch.allclose(y_triton.float(), y_torch.float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(g_triton, g_torch, rtol=3e-2, atol=3e-2)


def test_bf16_training_resumes_bit_identically_on_the_gpu(tmp_path):
    settings = dict(steps=4, batch_size=2, block_size=16, lr=5e-3, warmup=1, seed=1, eval_blocks=0,
                    precision="bf16", progress=False)
    data = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(2))

    def prepared():
        return qft.quantize_and_prepare(tiny_llama().to(CUDA), bits="nf4", method="loftq", rank=4, progress=False)

    straight = prepared()
    qft.train(straight, None, data, output_dir=tmp_path, save_every=2, **settings)
    resumed = prepared()  # continues from step 2 of the run above, with its CUDA RNG and moments
    qft.train(resumed, None, data, output_dir=tmp_path / "again", resume=tmp_path / "checkpoint-2", **settings)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            assert a.dtype == torch.float32 and a.is_cuda
            assert torch.equal(a, b), name


def test_prepare_train_save_load_on_the_gpu(tmp_path):
    """The README flow end to end on CUDA: LQ-LoRA, a few bf16 steps, save, load: the same logits."""
    model = qft.quantize_and_prepare(tiny_llama().to(CUDA), bits=3.0, rank=4, formats=SMALL_GRID,
                                     cache_dir=tmp_path / "cache", progress=False)
    data = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    qft.train(model, None, data, steps=3, batch_size=2, block_size=16, lr=1e-2, warmup=1, eval_blocks=0,
              precision="bf16", progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    model.eval()
    with torch.no_grad():
        expected = model(ids()).logits
    qft.save_quantized(model, tmp_path / "ckpt")
    loaded = qft.load_quantized(tmp_path / "ckpt", device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected)


def test_save_load_from_pretrained_and_export_on_the_gpu(tmp_path):
    model = qft.quantize_and_prepare(tiny_llama().to(CUDA), bits="nf4", method="qlora", rank=4, progress=False)
    with torch.no_grad():
        for layer in layers(model):
            layer.lora_B.normal_(0, 0.02)
        expected = model(ids()).logits
    qft.save_quantized(model, tmp_path / "ckpt")
    loaded = qft.load_quantized(tmp_path / "ckpt", device="cuda")
    assert all(layer.weight.is_cuda for layer in layers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="cuda")
    with torch.no_grad():
        assert torch.equal(hf(ids()).logits, expected)
    qft.export_merged(model, tmp_path / "int4")
    merged = qft.load_merged(tmp_path / "int4").to(CUDA)
    with torch.no_grad():
        assert torch.allclose(merged(ids()).logits.float(), expected, atol=0.1)


def test_the_command_uses_the_gpu(tmp_path):
    """qft quantize/eval on the embedded model with --device cuda (the default when a GPU is there)."""
    run = [sys.executable, "-m", "qft"]
    subprocess.run(run + ["quantize", "--bits", "nf4", "--method", "qlora", "--rank", "4", "--out",
                          str(tmp_path / "q"), "--quiet", "--device", "cuda"], check=True)
    out = subprocess.run(run + ["eval", str(tmp_path / "q"), "--max-blocks", "2", "--quiet", "--device", "cuda"],
                         check=True, capture_output=True, text=True)
    assert "held-out perplexity" in out.stdout
