"""(Not named gguf.py: run from benchmarks/, that would shadow the gguf package.) GGUF for llama.cpp: qft's mixed llama.cpp types against llama.cpp's own recipes, and what a user
deploys after training against what was trained. Every perplexity here is llama.cpp's own
(llama-perplexity, ctx 512: it scores the second half of each chunk) on qft's held-out text.

    bash benchmarks/gguf.sh                        # builds llama.cpp once (cached)
    python benchmarks/gguf_deploy.py [--parts recipes trained qalora] [--variants ...] [--types ...] [--steps 30]

recipes   llama.cpp's Q4_K_M, Q3_K_M and Q2_K, made by llama-quantize from an F16 GGUF of SmolLM2
          (the shipped Q4_1 file expanded), against qft's allocation over llama.cpp's types
          (--types symmetric (default) or all ten qft has; QLoRA-style rank 0, --variants: round to
          nearest, Fisher-weighted, Fisher + GPTQ rounding) at the same file size: qft's budget for the projections is
          what llama.cpp's file leaves after the embeddings (written as Q8_0 by qft) and norms.
trained   LQ-LoRA over llama.cpp's types (4.5 bits, rank 16) trained --steps steps (the finetune
          benchmark's schedule); the trained model as llama.cpp reads it: (ref) merged in f32,
          i.e. the trained model itself; (a) the base GGUF + the LoRA GGUF, unmerged; (b) merged,
          rounded once to f16, and rounded once into each layer's own type (round to nearest, GPTQ).
          Goal: (a) within 1 % of (ref).
qalora    (c) QA-LoRA on q4_1, trained the same way and merged into its offsets, with the
          embeddings in Q8_0 and in f16. Goal: within 1 % of the trained model. To tell the merge's
          cost from llama.cpp's Q4_1 arithmetic: the Q4_1 base + LoRA GGUF unmerged, and the merged
          Q4_1 values written densely in f32.
imatrix   llama.cpp's recipes calibrated with an importance matrix (llama-imatrix) over the text qft's
          Fisher and GPTQ read: llama.cpp's own answer to calibrated quantization.
speed     llama-bench's prompt (pp) and generation (tg) tokens/s of llama.cpp's recipes against qft's
          files of the same size (made by `recipes`), 2 threads, alternating rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from finetune import training_arguments
from lqlora import OUT, header
from llama_cpp import OUT as LLAMA_OUT
from llama_cpp import (bits_per_weight, default_gguf, find_llama_cpp, importance_matrix, perplexity, quantize, speed,
                       tensor_types, write_calibration, write_heldout)

import qft
from qft.exports.merged import dense_model
from qft.prepare.report import markdown_table
from qft.quant.formats import get_format
from qft.quant.formats.ggml import GGML_TYPES
from qft.training.evaluate import perplexity as qft_perplexity
from qft.training.loop import train

WORK = OUT / "gguf"
RECIPES = ("Q4_K_M", "Q3_K_M", "Q2_K")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TYPES = tuple(GGML_TYPES)  # every llama.cpp type qft has: q8_0, q4_0, q5_0, q6_k, q3_k, q4_1, q5_1, q2_k, q4_k, q5_k
SYMMETRIC = ("q3_k", "q4_0", "q5_0", "q6_k", "q8_0")  # no offset: none of them holds this model's Q4_1 grid exactly
VARIANTS = {"rtn": (False, False), "fisher": (True, False), "fisher-gptq": (True, True)}  # label -> (fisher, gptq)


def f16_gguf() -> Path:
    """SmolLM2 as F16 (llama-quantize expands the shipped Q4_1; the values are the Q4_1 ones)."""
    path = LLAMA_OUT / "SmolLM2-135M-Instruct.F16.gguf"
    if not path.is_file():
        quantize(default_gguf(), path, "F16")
    return path


def projection_params(model) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS)


def llama_recipe(qtype: str, text: Path) -> dict:
    path = WORK / f"llama-{qtype}.gguf"
    if not path.is_file():
        quantize(f16_gguf(), path, qtype)
    return {"file": f"llama.cpp {qtype}", "MiB": path.stat().st_size / 2**20, "bits/weight": bits_per_weight(path),
            "llama.cpp ppl": perplexity(path, text), "types": str(tensor_types(path))}


def fisher_weights() -> dict:
    """The empirical Fisher of SmolLM2's projections (the embedded corpus's train split), computed once and
    shared by every Fisher-weighted allocation below: it does not depend on the budget."""
    model, tokenizer = qft.default_model(progress=False)
    return qft.empirical_fisher(model, tokenizer, qft.find_target_linears(model), progress=False)


def qft_recipe(target_bytes: int, text: Path, label: str, *, types: tuple, fisher: dict | None, gptq: bool) -> dict:
    model, tokenizer = qft.default_model(progress=False)
    probe = WORK / "probe.gguf"  # the bytes everything but the projections takes when written by qft
    qft.quantize_(model, qft.QLoRAConfig(bits="q8_0", rank=0), progress=False)
    qft.export_gguf(model, probe, tokenizer, dtype="q8_0")
    n = projection_params(model)
    q8_bytes = sum(get_format("q8_0").storage_bits(*m.weight.shape) // 8
                   for m in qft.nn.qft_layers(model).values())
    rest = probe.stat().st_size - q8_bytes
    bits = (target_bytes - rest) * 8 / n
    model, tokenizer = qft.default_model(progress=False)
    config = qft.QLoRAConfig(bits=round(bits, 4), rank=0, formats=types, fisher=fisher is not None,
                             rounding="gptq" if gptq else "rtn")
    start = time.perf_counter()
    qft.quantize_(model, config, tokenizer=tokenizer, fisher=fisher, progress=False)
    seconds = time.perf_counter() - start
    path = WORK / f"qft-{label}.gguf"
    qft.export_gguf(model, path, tokenizer, dtype="q8_0")
    chosen = {}
    for layer in qft.nn.qft_layers(model).values():
        chosen[layer.weight.format.name] = chosen.get(layer.weight.format.name, 0) + 1
    return {"file": f"qft {label} ({bits:.3f} bits on projections)", "MiB": path.stat().st_size / 2**20,
            "bits/weight": bits_per_weight(path), "llama.cpp ppl": perplexity(path, text),
            "types": str(dict(sorted(chosen.items()))), "quantize s": seconds}


def part_imatrix(args, text: Path) -> list[dict]:
    """llama.cpp's recipes calibrated: an importance matrix (llama-imatrix) over the text qft's Fisher and GPTQ
    read (the embedded corpus's train split, 64 chunks of 512 tokens), fed to llama-quantize --imatrix."""
    matrix = WORK / "imatrix.gguf"
    if not matrix.is_file():
        importance_matrix(f16_gguf(), write_calibration(WORK / "calibration.txt"), matrix)
    rows = []
    for qtype in RECIPES:
        path = WORK / f"llama-{qtype}-imatrix.gguf"
        if not path.is_file():
            quantize(f16_gguf(), path, qtype, imatrix=matrix)
        rows.append({"file": f"llama.cpp {qtype} + imatrix", "MiB": path.stat().st_size / 2**20,
                     "bits/weight": bits_per_weight(path), "llama.cpp ppl": perplexity(path, text),
                     "types": str(tensor_types(path))})
        print(rows[-1], flush=True)
    return rows


def part_recipes(args, text: Path) -> list[dict]:
    rows = []
    fisher = fisher_weights() if any(VARIANTS[v][0] for v in args.variants) else None
    for qtype in RECIPES:
        row = llama_recipe(qtype, text)
        rows.append(row)
        print(row, flush=True)
        target = (WORK / f"llama-{qtype}.gguf").stat().st_size
        types = SYMMETRIC if args.types == "symmetric" else TYPES
        for label in args.variants:
            weighted, gptq = VARIANTS[label]
            row = qft_recipe(target, text, f"{args.types}-{label}-as-{qtype}", types=types,
                             fisher=fisher if weighted else None, gptq=gptq)
            rows.append(row)
            print(row, flush=True)
    return rows


def part_speed(args) -> list[dict]:
    """Tokens/s of each recipe's file against qft's files of the same size, in alternating rounds (the machine
    is shared: the median of the rounds, and each file's ratio to llama.cpp's within the same round)."""
    rows = []
    for qtype in RECIPES:
        ours = sorted(WORK.glob(f"qft-*-as-{qtype}.gguf"))
        if not ours:
            continue
        files = [WORK / f"llama-{qtype}.gguf", *ours]
        rounds = [speed(files if r % 2 == 0 else files[::-1]) for r in range(args.rounds)]
        for path in files:
            row = {"file": path.stem, "MiB": path.stat().st_size / 2**20}
            for kind in ("pp", "tg"):
                row[f"{kind} t/s"] = statistics.median(r[str(path)][kind] for r in rounds)
                row[f"{kind} vs llama.cpp"] = statistics.median(r[str(path)][kind] / r[str(files[0])][kind]
                                                                for r in rounds)
            rows.append(row)
            print(row, flush=True)
    return rows


def trained(config, args) -> tuple:
    model, tokenizer = qft.default_model(progress=False)
    qft.quantize_(model, config, tokenizer=tokenizer, progress=False)
    before = qft_perplexity(model, tokenizer, progress=False)
    train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=512, lr=args.lr,
          warmup=args.warmup, seed=0, progress=False, eval_blocks=0)
    return model, tokenizer, before, qft_perplexity(model, tokenizer, progress=False)


def part_trained(args, text: Path) -> list[dict]:
    rows = []
    model, tokenizer, before, after = trained(qft.LQLoRAConfig(bits=4.5, rank=16, formats=TYPES), args)
    files = {"ref": WORK / "lqlora-merged-f32.gguf", "base": WORK / "lqlora-base.gguf",
             "lora": WORK / "lqlora-lora.gguf", "merged": WORK / "lqlora-merged-f16.gguf",
             "rtn": WORK / "lqlora-requantized-rtn.gguf", "gptq": WORK / "lqlora-requantized-gptq.gguf"}
    qft.export_gguf(model, files["ref"], tokenizer, dtype="f32", adapters="merged")
    qft.export_gguf(model, files["base"], tokenizer, dtype="q8_0")
    qft.export_gguf_lora(model, files["lora"])
    qft.export_gguf(model, files["merged"], tokenizer, dtype="f16", adapters="merged")
    for rounding in ("rtn", "gptq"):  # W + BA rounded once into each layer's own type: one file, the base's size
        qft.export_gguf(model, files[rounding], tokenizer, dtype="q8_0", adapters="requantized", rounding=rounding,
                        progress=False)
    ref = perplexity(files["ref"], text)
    common = {"method": "lqlora 4.5 bits, rank 16", "qft ppl before": before, "qft ppl after": after}
    for label, path, lora in (("(ref) trained model, merged f32", files["ref"], None),
                              ("(a) base + LoRA GGUF, unmerged", files["base"], files["lora"]),
                              ("(b) merged, f16", files["merged"], None),
                              ("(b) merged into each layer's own type, round to nearest", files["rtn"], None),
                              ("(b) merged into each layer's own type, GPTQ", files["gptq"], None),
                              ("base alone (no adapter)", files["base"], None)):
        ppl = ref if lora is None and path == files["ref"] else perplexity(path, text, lora=lora)
        rows.append({**common, "llama.cpp reads": label, "MiB": (path.stat().st_size + (lora.stat().st_size if lora
                     else 0)) / 2**20, "llama.cpp ppl": ppl, "vs ref": ppl / ref - 1})
        print(rows[-1], flush=True)
    return rows


def part_qalora(args, text: Path) -> list[dict]:
    """(c): QA-LoRA on q4_1 merged into its offsets; the embeddings in Q8_0 and in f16 (what a quantized
    embedding costs); served unmerged and written densely (what llama.cpp's Q4_1 arithmetic costs)."""
    from qft.methods.qalora import merge_qalora

    rows = []
    model, tokenizer, before, after = trained(qft.QALoRAConfig(bits="q4_1", rank=16), args)
    files = {"ref": WORK / "qalora-f32.gguf", "base": WORK / "qalora-base-q4_1.gguf", "lora": WORK / "qalora-lora.gguf",
             "q8_0": WORK / "qalora-merged-q4_1.gguf", "f16": WORK / "qalora-merged-q4_1-f16-embeddings.gguf",
             "dense": WORK / "qalora-merged-q4_1-values-f32.gguf"}
    qft.export_gguf(model, files["ref"], tokenizer, dtype="f32", adapters="merged")
    qft.export_gguf(model, files["base"], tokenizer, dtype="f16")
    qft.export_gguf_lora(model, files["lora"])
    # the offsets' fp16 rounding chosen by GPTQ (the embedded corpus's train split): merge_qalora(rounding="gptq")
    chosen = merge_qalora(copy.deepcopy(model), rounding="gptq", tokenizer=tokenizer, progress=False)
    for dtype in ("q8_0", "f16"):
        files[f"gptq-{dtype}"] = WORK / f"qalora-merged-gptq-q4_1-{dtype}-embeddings.gguf"
        qft.export_gguf(chosen, files[f"gptq-{dtype}"], tokenizer, dtype=dtype)
    del chosen
    merge_qalora(model)
    for dtype in ("q8_0", "f16"):
        qft.export_gguf(model, files[dtype], tokenizer, dtype=dtype)
    # the merged Q4_1 values written densely in f32: what the merge itself costs, without llama.cpp's Q4_1 kernels
    qft.export_gguf(dense_model(model, torch.float32, merged=True), files["dense"], tokenizer, dtype="f32")
    ref = perplexity(files["ref"], text)
    common = {"method": "qalora q4_1, rank 16", "qft ppl before": before, "qft ppl after": after}
    for label, path, lora in (("(ref) trained model, merged f32", files["ref"], None),
                              ("Q4_1 base (f16 embeddings) + LoRA GGUF, unmerged", files["base"], files["lora"]),
                              ("(c) merged into q4_1's offsets, Q8_0 embeddings", files["q8_0"], None),
                              ("(c) merged into q4_1's offsets, f16 embeddings", files["f16"], None),
                              ("(c) merged, offsets rounded by GPTQ, Q8_0 embeddings", files["gptq-q8_0"], None),
                              ("(c) merged, offsets rounded by GPTQ, f16 embeddings", files["gptq-f16"], None),
                              ("the merged Q4_1 values, dense f32", files["dense"], None)):
        ppl = ref if path == files["ref"] else perplexity(path, text, lora=lora)
        rows.append({**common, "llama.cpp reads": label, "MiB": (path.stat().st_size + (lora.stat().st_size if lora
                     else 0)) / 2**20, "llama.cpp ppl": ppl, "vs ref": ppl / ref - 1})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(parser, ["gguf"])
    parser.add_argument("--parts", nargs="+", default=["recipes", "imatrix", "trained", "qalora", "speed"],
                        choices=["recipes", "imatrix", "trained", "qalora", "speed"])
    parser.add_argument("--rounds", type=int, default=4, help="speed: alternating rounds of llama-bench")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="recipes: qft's allocations to run (round to nearest; Fisher-weighted; Fisher + GPTQ)")
    parser.add_argument("--types", choices=["symmetric", "all"], default="symmetric",
                        help="recipes: the ggml types qft may choose from (all: the asymmetric ones too, which hold "
                             "this Q4_1-derived model's own grid exactly)")
    args = parser.parse_args()
    if find_llama_cpp() is None:
        raise SystemExit("llama.cpp is not built: run `bash benchmarks/gguf.sh` first")
    header()
    WORK.mkdir(parents=True, exist_ok=True)
    text = write_heldout(WORK / "heldout.txt")
    torch.manual_seed(0)
    results = {}
    if "recipes" in args.parts:
        results["recipes"] = part_recipes(args, text)
        print(markdown_table(results["recipes"], ".3f"), flush=True)
    if "imatrix" in args.parts:
        results["imatrix"] = part_imatrix(args, text)
        print(markdown_table(results["imatrix"], ".3f"), flush=True)
    if "trained" in args.parts:
        results["trained"] = part_trained(args, text)
        print(markdown_table(results["trained"], ".4f"), flush=True)
    if "qalora" in args.parts:
        results["qalora"] = part_qalora(args, text)
        print(markdown_table(results["qalora"], ".4f"), flush=True)
    if "speed" in args.parts:
        results["speed"] = part_speed(args)
        print(markdown_table(results["speed"], ".3f"), flush=True)
    (WORK / f"results-{'-'.join(args.parts)}-{args.types}-{'-'.join(args.variants)}.json").write_text(
        json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
