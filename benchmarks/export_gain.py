"""Where the merged int4 export loses the training gain (issue 12's diagnosis).

    python benchmarks/finetune.py --runs lqlora-2.5 --keep   # a trained LQ-LoRA adapter and its base
    python benchmarks/export_gain.py

Held-out perplexity of SmolLM2 (embedded corpus, 512-token blocks) for:
  fp32                  the untouched model
  fp32, int4 RTN        the untouched model, every projection rounded as the merged export rounds
                        (symmetric absmax int4, groups of 128 or the largest power of two dividing)
  trained (qft)         the trained LQ-LoRA model as qft runs it (Q + BA)
  W' dense fp32 / bf16  W' = dequant(Q) + BA written densely (the hand-off to other quantizers)
  W', exported          export_merged as each of EXPORTS configures it: symmetric (W4A16) or
                        asymmetric (W4A16_ASYM, a zero-point per group), round to nearest or GPTQ
                        (same scales, GPTQ's codes), GPTQ with act-order; bf16 scales, read back
  W', int8 / int4 RTN   W' rounded again, symmetric absmax per group
If int4 RTN of the untouched model already costs about what the export loses, the second
rounding of W' is the cause, and a better rounding (GPTQ on W') is the cure.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from lqlora import OUT, header

import qft
from qft.training.evaluate import perplexity
from qft.exports.merged import group_for, quantize_symmetric
from qft.prepare.report import markdown_table
from qft.nn.targets import find_target_linears

KEPT = OUT / "finetune"
EXPORTS = {
    "sym-gptq": {"rounding": "gptq", "act_order": False},
    "sym-gptq-act": {"rounding": "gptq", "act_order": True},
    "asym-rtn": {"symmetric": False},
    "asym-gptq": {"symmetric": False, "rounding": "gptq", "act_order": False},
    "asym-gptq-act": {"symmetric": False, "rounding": "gptq", "act_order": True},
}


def rtn(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """What the merged export writes, at ``bits``, dequantized: symmetric absmax round-to-nearest per group."""
    rows, cols = w.shape
    group = group_for(cols, group_size) or cols
    q, scale = quantize_symmetric(w, group, torch.float32, bits)
    return (q.float().reshape(rows, -1, group) * scale[..., None]).reshape(rows, cols)


def dense_copy(weights: dict[str, torch.Tensor]):
    """The embedded model (fp32) with the given projection weights."""
    model, _ = qft.default_model(progress=False)
    with torch.no_grad():
        for name, layer in find_target_linears(model).items():
            layer.weight.copy_(weights[name])
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="lqlora-2.5")
    parser.add_argument("--max-blocks", type=int, help="evaluate only the first held-out blocks")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fp32", "dense"],
                        help="leave out the untouched-model rows or the rows of W' rounded in memory")
    parser.add_argument("--exports", nargs="*", default=list(EXPORTS), choices=list(EXPORTS),
                        help="the export_merged settings to measure (the GPTQ ones take minutes each)")
    args = parser.parse_args()
    header()
    rows = []

    def row(what, model, tokenizer):
        ppl = perplexity(model, tokenizer, max_blocks=args.max_blocks, progress=False)
        rows.append({"model": what, "held-out ppl": ppl})
        print(rows[-1], flush=True)

    model, tokenizer = qft.default_model(progress=False)
    if "fp32" not in args.skip:
        original = {n: m.weight.detach().float().clone() for n, m in find_target_linears(model).items()}
        row("fp32", model, tokenizer)
        row("fp32, int4 RTN (as the export rounds)", dense_copy({n: rtn(w, 4) for n, w in original.items()}), tokenizer)
    trained = qft.load_quantized(KEPT / args.run / "base")
    qft.load_adapter(trained, KEPT / args.run / "adapter")
    row(f"trained {args.run} (qft: Q + BA)", trained, tokenizer)
    for name in args.exports:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            qft.export_merged(trained, tmp, tokenizer, progress=False, **EXPORTS[name])
            seconds = time.perf_counter() - start
            row(f"W', exported {name} {EXPORTS[name]}", qft.load_merged(tmp).float(), tokenizer)
            rows[-1]["export s"] = seconds
    if "dense" in args.skip:
        print(markdown_table(rows, ".3f"))
        return
    merged = {n: m.merged_weight() for n, m in trained.named_modules() if isinstance(m, qft.QLinear)}
    del trained
    row("W' dense fp32", dense_copy(merged), tokenizer)
    row("W' rounded to bf16 (fp32 compute)", dense_copy({n: w.bfloat16().float() for n, w in merged.items()}), tokenizer)
    row("W', int8 RTN", dense_copy({n: rtn(w, 8) for n, w in merged.items()}), tokenizer)
    row("W', int4 RTN (the merged export)", dense_copy({n: rtn(w, 4) for n, w in merged.items()}), tokenizer)
    print(markdown_table(rows, ".3f"))


if __name__ == "__main__":
    main()
