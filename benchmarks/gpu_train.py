"""One training step of SmolLM2-135M on one CUDA GPU: qft LQ-LoRA at 2.5 bits against PEFT + bitsandbytes QLoRA.

    python benchmarks/gpu_train.py [--batch 4] [--seq 512] [--steps 10]

Both models: the embedded SmolLM2-135M-Instruct (``qft.default_model()``), all 7 projections of every
layer quantized, LoRA rank 64, frozen parts in bf16, trainable weights in fp32, bf16 autocast, AdamW,
the same batch of random tokens (``--batch`` x ``--seq``).
- qft: ``quantize_and_prepare(bits=2.5, method="lqlora", rank=64)`` (no Fisher), run on the GPU.
- QLoRA: bitsandbytes ``Linear4bit`` NF4, block 64, double-quantized scales, compute dtype bf16, then
  PEFT ``LoraConfig(r=64)``.
A step is forward, backward and optimizer step; s/step is the median over ``--steps`` steps after 3
warm-up steps, each timed with CUDA events. Peak memory is ``torch.cuda.max_memory_allocated`` over the
steps (weights, activations, gradients, AdamW state). Markdown on stdout, progress on stderr. Needs a
CUDA GPU, bitsandbytes and peft.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import qft
from qft.prepare.report import markdown_table
from qft.nn.targets import set_module

RANK = 64
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qft_lqlora():
    model, _ = qft.default_model(progress=False)
    model = qft.quantize_and_prepare(model.cuda(), bits=2.5, method="lqlora", rank=RANK, fisher=False, progress=False)
    model.to(torch.bfloat16)  # QLinear keeps its packed codes; the adapters come back to fp32 below
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, f"{model.qft_report.bits:.3f}"


def peft_qlora():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model, _ = qft.default_model(dtype=torch.bfloat16, progress=False)
    for name, layer in qft.find_target_linears(model).items():
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=True)
        set_module(model, name, q)
    model = model.cuda()  # Params4bit quantizes on the move
    config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=PROJECTIONS)
    return get_peft_model(model, config), "4.127 (NF4, double-quantized scales)"


def measure(build, batch: torch.Tensor, steps: int) -> dict:
    torch.cuda.empty_cache()
    start = time.perf_counter()
    model, bits = build()
    prepare_s = time.perf_counter() - start
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(3 + steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(begin.elapsed_time(end) / 1e3)
    result = {"bits/param (quantized part)": bits, "s/step": statistics.median(times),
              "peak GB": torch.cuda.max_memory_allocated() / 1e9, "model GB": weights / 1e9,
              "trainable params": sum(p.numel() for p in trainable), "last loss": float(loss),
              "prepare s": prepare_s}
    del model, optimizer, trainable
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_train.py needs a CUDA GPU; none here")
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 49152, (args.batch, args.seq), generator=gen).cuda()
    rows = []
    for run, build in (("qft LQ-LoRA 2.5 bits, r64", qft_lqlora), ("PEFT + bitsandbytes QLoRA, r64", peft_qlora)):
        print(run, file=sys.stderr, flush=True)
        rows.append({"run": run, **measure(build, batch, args.steps)})
    print(f"SmolLM2-135M, batch {args.batch} x {args.seq} tokens, bf16 autocast, AdamW, median of {args.steps} "
          "steps after 3 warm-up steps.\n")
    print(markdown_table(rows, ".4g"))


if __name__ == "__main__":
    main()
