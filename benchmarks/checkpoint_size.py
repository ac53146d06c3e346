"""Bytes on disk of a qft checkpoint, as saved and re-saved with dtype=bfloat16.

    python benchmarks/checkpoint_size.py runs/end_to_end/model

Prints a markdown table (quantized codes + scales, low-rank factors, everything else, the files)
and checks that the bf16 copy loads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import qft
from qft.files.checkpoint import checkpoint_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    rows = {"as saved": checkpoint_sizes(args.checkpoint)}
    with tempfile.TemporaryDirectory() as tmp:
        model = qft.load_quantized(args.checkpoint)
        qft.save_quantized(model, Path(tmp) / "bf16", dtype=torch.bfloat16)
        rows["dtype=bfloat16"] = checkpoint_sizes(Path(tmp) / "bf16")
        qft.load_quantized(Path(tmp) / "bf16")
    n = rows["as saved"]["parameters_quantized"]
    print("| save | quantized | low-rank factors | everything else | files | quantized bits/param |")
    print("|---|---|---|---|---|---|")
    for name, s in rows.items():
        mib = {k: s[k] / 2**20 for k in ("quantized", "low_rank", "other", "file")}
        print(f"| {name} | {mib['quantized']:.1f} MiB | {mib['low_rank']:.1f} MiB | {mib['other']:.1f} MiB "
              f"| {mib['file']:.1f} MiB | {8 * s['quantized'] / n:.4f} |")


if __name__ == "__main__":
    main()
