"""Streaming quantization of a model larger than SmolLM2: peak memory and time, streamed vs loaded.

    python benchmarks/streaming.py [--bits nf3-b64] [--method qlora] [--layers 22]

Writes once a random LLaMA-style model (TinyLlama-1.1B's shape: hidden 2048, MLP 5632, 32 heads /
4 KV heads, vocabulary 32000, --layers decoder layers; bf16, 1 GB safetensors shards) to
benchmarks/out/random-llama, then quantizes it in two fresh processes:
  streamed  quantize_and_prepare(folder, ...): target weights read one at a time from the shards
  on-load   AutoModelForCausalLM.from_pretrained(folder, dtype=float32, quantization_config=qft config)
  loaded    AutoModelForCausalLM.from_pretrained(folder, dtype=float32), then quantize_and_prepare
Each reports its peak RSS (sampled every 50 ms), its peak without file-backed shared pages (mapped
shards), the same above the interpreter with torch and
transformers imported, the bytes the prepared model holds, one decoder layer's weights in fp32,
and the time. Goal: streamed peak <= 1.5 x (prepared model + largest layer in fp32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from finetune import PeakRSS
from lqlora import OUT, header

from qft.methods.config import config_for
from qft.prepare.report import markdown_table

FOLDER = OUT / "random-llama"


def write_model(layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, dtype="bfloat16")
    if (FOLDER / "config.json").is_file() and json.loads((FOLDER / "config.json").read_text()).get(
            "num_hidden_layers") == layers:
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(FOLDER, max_shard_size="1GB")
    print(f"# wrote {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters to {FOLDER}", flush=True)


def held_bytes(model) -> int:
    """Bytes of every parameter and buffer the prepared model holds (packed weights as stored)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.nbytes if hasattr(t, "format") else t.numel() * t.element_size() for t in tensors.values())


def one_run(mode: str, bits: str, method: str) -> dict:
    import qft

    with PeakRSS() as idle:
        time.sleep(0.2)
    start = time.perf_counter()
    with PeakRSS() as rss:
        if mode == "streamed":
            model = qft.quantize_and_prepare(FOLDER, bits=bits, method=method, progress=False, cache_dir=False)
        elif mode == "on-load":
            from transformers import AutoModelForCausalLM

            config = config_for(method, bits=bits)
            model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32, quantization_config=config)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)
            model = qft.quantize_and_prepare(model, bits=bits, method=method, fisher=False, progress=False,
                                             cache_dir=False)  # data-free, as the streamed run
    seconds = time.perf_counter() - start
    # one decoder layer's weights in fp32 before quantization (from the config: the layers are alike)
    c = model.config
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    fp32_layer = 4 * (2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
                      + 2 * c.hidden_size)
    return {"mode": mode, "bits": bits, "method": method, "peak RSS GB": rss.peak / 1e9,
            "peak private GB": rss.peak_private / 1e9,
            "imports GB": idle.peak / 1e9, "prepared model GB": held_bytes(model) / 1e9,
            "largest layer fp32 GB": fp32_layer / 1e9, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="nf3-b64", help="a format name or an average budget")
    parser.add_argument("--method", default="qlora")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--runs", nargs="+", default=["streamed", "on-load", "loaded"],
                        choices=["streamed", "on-load", "loaded"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.bits, args.method)), flush=True)
        return
    header()
    OUT.mkdir(exist_ok=True)
    write_model(args.layers)
    rows = []
    for mode in args.runs:
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--bits", args.bits, "--method", args.method],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{mode} failed:\n{done.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        row["peak above imports GB"] = row["peak RSS GB"] - row["imports GB"]
        row["goal GB (1.5 x (model + layer))"] = 1.5 * (row["prepared model GB"] + row["largest layer fp32 GB"])
        print(row, flush=True)
    print(markdown_table(rows, ".3f"))
    (OUT / "streaming.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
