"""Quantize every projection matrix of the embedded SmolLM2-135M in several formats
and print each format's relative error and real storage cost.

    python examples/quantize_formats.py [--formats nf4 nf3-b64-dq8b256 ...] [--quiet]
"""

import argparse
import logging

import qft
from qft.prepare.report import markdown_table

DEFAULT_FORMATS = ["nf4-b64", "nf4-b64-dq8b256", "nf3-b64-dq8b256", "nf2-b64-dq8b256",
                   "int4-g128", "int3-g64", "int8-ch", "fp8-e4m3-row"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    model, _ = qft.default_model(progress=not args.quiet)
    weights = {name: layer.weight.detach() for name, layer in qft.find_target_linears(model).items()}
    print(f"SmolLM2-135M-Instruct: {len(weights)} projection matrices, "
          f"{sum(w.numel() for w in weights.values()) / 1e6:.1f}M weights")
    rows = qft.quantization_error_table(weights, args.formats, progress=not args.quiet)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
