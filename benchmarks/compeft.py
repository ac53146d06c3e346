"""ComPEFT on adapters trained by the finetune benchmark: bytes on disk vs held-out perplexity.

    python benchmarks/finetune.py --runs lora lqlora-2.5 peqa-int4-ch --keep   # trains, keeps adapters
    python benchmarks/compeft.py                                              # then this
    python benchmarks/compeft.py --runs lora --scope tensor --append          # PEFT LoRA per tensor too

For each kept adapter (benchmarks/out/finetune/<run>/) and each density, the adapter is
compressed with qft.compress_adapter (α searched on 4 blocks of the corpus's *train* split),
decompressed, swapped into its base and evaluated on the held-out split. Reported: the .qftc
file's bytes against the adapter in fp16 and fp32, the payload against the entropy bound, the
same positions and signs under lzma (preset 9, extreme) for comparison, encode/decode seconds
of both, and the perplexity change from the uncompressed adapter. Writes docs/compeft.png.

bitsandbytes QLoRA is not here: on this CPU, bitsandbytes 0.50.2's Linear4bit gives different
outputs after its first no-grad forward (RESULTS.md), so an α search over repeated evaluations
of it would measure that, not ComPEFT.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lqlora import OUT, header

import qft
from qft.exports.compeft import compress_adapter, decompress_adapter, info, load_compressed
from qft.training.evaluate import perplexity
from qft.prepare.report import markdown_table

DENSITIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
RUNS = ["lqlora-2.5", "lora", "peqa-int4-ch"]
KEPT = OUT / "finetune"


def lzma_bytes(ternary) -> tuple[int, float, float]:
    """(bytes, encode s, decode s) of lzma over the same positions (as a bitmask) and signs."""
    start = time.perf_counter()
    parts = []
    for t in ternary.values():
        mask = np.zeros(t.numel, dtype=bool)
        mask[t.positions.numpy()] = True
        parts.append(np.packbits(mask).tobytes() + np.packbits(t.negative.numpy()).tobytes())
    packed = lzma.compress(b"".join(parts), preset=9 | lzma.PRESET_EXTREME)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    lzma.decompress(packed)
    return len(packed), encode, time.perf_counter() - start


def model_for(run: str):
    """(model with the trained adapter in place, tokenizer, base argument for compress_adapter, swap)."""
    model, tokenizer = qft.default_model(progress=False)
    folder = KEPT / run
    if run == "lora":
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        base = copy.deepcopy(model)
        peft_model = PeftModel.from_pretrained(model, folder / "adapter").eval()

        def swap(adapter_dir):
            set_peft_model_state_dict(peft_model, load_file(Path(adapter_dir) / "adapter_model.safetensors"))
        return peft_model, tokenizer, base, swap
    loaded = qft.load_quantized(folder / "base")
    qft.load_adapter(loaded, folder / "adapter")
    return loaded, tokenizer, folder / "base", lambda adapter_dir: qft.load_adapter(loaded, adapter_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--densities", nargs="+", type=float, default=DENSITIES)
    parser.add_argument("--scope", default="global", choices=["global", "tensor"],
                        help="top-k and scale over the whole adapter (the paper's code) or per tensor")
    parser.add_argument("--append", action="store_true",
                        help="add these rows to benchmarks/out/compeft.json (table and picture) instead of replacing")
    args = parser.parse_args()
    header()
    saved = OUT / "compeft.json"
    rows = json.loads(saved.read_text()) if args.append and saved.exists() else []
    for run in args.runs:
        model, tokenizer, base, swap = model_for(run)
        full = perplexity(model, tokenizer, progress=False)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"# {run}: {params:,} trainable parameters, held-out ppl {full:.3f} uncompressed", flush=True)
        for density in args.densities:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = compress_adapter(KEPT / run / "adapter", Path(tmp) / "a.qftc", density=density,
                                           base=base, tokenizer=tokenizer, scope=args.scope, progress=False)
                compress_s = time.perf_counter() - start
                start = time.perf_counter()
                _, ternary = load_compressed(Path(tmp) / "a.qftc")
                decode_s = time.perf_counter() - start
                decompress_adapter(Path(tmp) / "a.qftc", Path(tmp) / "back", base=base)
                swap(Path(tmp) / "back")
                ppl = perplexity(model, tokenizer, progress=False)
                xz, xz_encode, xz_decode = lzma_bytes(ternary)
            swap(KEPT / run / "adapter")
            rows.append({
                "adapter": run if args.scope == "global" else f"{run} (per tensor)", "density": density, "alpha": summary["alpha"], ".qftc bytes": summary["file_bytes"],
                "x smaller than fp16": summary["fp16_bytes"] / summary["file_bytes"],
                "x smaller than fp32": 2 * summary["fp16_bytes"] / summary["file_bytes"],
                "payload / entropy bound": summary["payload_over_bound"], "lzma bytes (same content)": xz,
                "decode s": decode_s, "lzma encode s": xz_encode, "lzma decode s": xz_decode,
                "compress s (incl. alpha search)": compress_s, "ppl": ppl, "ppl change %": 100 * (ppl / full - 1),
            })
            print(rows[-1], flush=True)
    saved.write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows, ".4g"))
    plot(rows)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in dict.fromkeys(r["adapter"] for r in rows):
        mine = [r for r in rows if r["adapter"] == run]
        ax.plot([r["x smaller than fp16"] for r in mine], [r["ppl change %"] for r in mine], "o-", label=run)
        for r in mine:
            ax.annotate(f"{r['density']:g}", (r["x smaller than fp16"], r["ppl change %"]), fontsize=7)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("times smaller than the adapter in fp16 (log)")
    ax.set_ylabel("held-out perplexity change, %")
    ax.set_title("ComPEFT on SmolLM2 adapters (labels: density)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(__file__).parent.parent / "docs" / "compeft.png", dpi=120)


if __name__ == "__main__":
    main()
