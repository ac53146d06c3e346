"""Greedy generation speed on the embedded SmolLM2-135M: fp32 against qft, side by side in one run.

    python benchmarks/generate.py                  # 48 new tokens, 3 repeats, median
    python benchmarks/generate.py --tokens 96 --repeats 5

Rows: the fp32 model; per format, qft's QLinear + LoRA r64 as `quantize_and_prepare` leaves it
(every forward dequantizes every weight) and the same inside `qft.dense_weights(model)` (weights
dequantized once, the cache's size reported). The cost of dequantizing depends on the code width,
so NF4, NF3 and NF2 rows are shown. All rows generate from the same prompt.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from lqlora import header

import qft
from qft.prepare.report import markdown_table

FORMATS = ["nf4-b64", "nf3-b64-dq8b256", "nf2-b64-dq8b256"]


def timed_generate(model, prompt, tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header()
    torch.manual_seed(0)
    base, tokenizer = qft.default_model(progress=False)
    chat = [{"role": "user", "content": "What does the Python `with` statement do?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    rows = []
    fp32_s, fp32_out = timed_generate(base, prompt, args.tokens, args.repeats)
    rows.append({"model": "fp32", "s": fp32_s, "tokens/s": args.tokens / fp32_s, "vs fp32": 1.0,
                 "cache MiB": 0.0, "same tokens as fp32": "-"})
    for fmt in FORMATS:
        model = qft.quantize_and_prepare(copy.deepcopy(base), bits=fmt, method="qlora", rank=64, progress=False)
        plain_s, plain_out = timed_generate(model, prompt, args.tokens, args.repeats)
        with qft.dense_weights(model) as held:
            cached_s, cached_out = timed_generate(model, prompt, args.tokens, args.repeats)
        assert torch.equal(plain_out, cached_out), "the dense cache changed the generated tokens"
        same = f"{int((plain_out == fp32_out).sum()) - prompt['input_ids'].shape[1]}/{args.tokens}"
        for label, s, mib in ((f"qft {fmt} + LoRA r64", plain_s, 0.0),
                              (f"qft {fmt} + LoRA r64, dense_weights", cached_s, held / 2**20)):
            rows.append({"model": label, "s": s, "tokens/s": args.tokens / s, "vs fp32": s / fp32_s,
                         "cache MiB": mib, "same tokens as fp32": same})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    print(f"\n{args.tokens} new tokens, greedy, batch 1, median of {args.repeats}\n")
    print(markdown_table(rows, ".2f"))


if __name__ == "__main__":
    main()
