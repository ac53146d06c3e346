"""Quantize the embedded SmolLM2-135M to an average bit budget with Fisher-weighted
LQ-LoRA and compare held-out perplexity before and after (no training yet).

    python examples/quantize_and_prepare.py [--bits 2.5] [--rank 64] [--no-fisher] [--quiet]

The first run measures the Fisher and fills the error table (several minutes on
2 CPU cores); the table is cached in ~/.cache/qft (or $QFT_CACHE) for later runs.
"""

import argparse
import logging

import qft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="2.5", help="average bits per parameter, or a format name such as nf4")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--no-fisher", dest="fisher", action="store_false",
                        help="plain LQ-LoRA: do not weight errors by the empirical Fisher")
    parser.add_argument("--heatmap", default="bits.png", help="where to draw the allocation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    progress = not args.quiet
    bits = args.bits if args.bits.startswith(("nf", "int", "fp")) else float(args.bits)

    model, tokenizer = qft.default_model(progress=progress)
    before = qft.perplexity(model, tokenizer, progress=progress)
    qft.quantize_and_prepare(model, bits=bits, rank=args.rank, fisher=args.fisher, tokenizer=tokenizer,
                             progress=progress)
    after = qft.perplexity(model, tokenizer, progress=progress)

    report = model.qft_report
    print(report.summary())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable / 1e6:.1f}M")
    print(f"held-out perplexity: {before:.2f} (full precision) -> {after:.2f} ({report.bits:.3f} bits/param)")
    if report.solution is not None:
        print(f"allocation heat map: {qft.bits_heatmap(report, args.heatmap)}")


if __name__ == "__main__":
    main()
