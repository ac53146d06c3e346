"""Zero-shot accuracy and perplexity of quantized models, peers side by side (issue 25's table).

    python benchmarks/accuracy.py [--model smollm2-135m|gemma3-270m] [--configs fp32 bnb-nf4 ...] [--limit 500]
                                  [--steps 0]

Every config starts from the named model (default: the embedded SmolLM2-135M-Instruct; gemma3-270m
needs its optional packages, qft.files.models.MODELS). Accuracy is qft.evaluate_tasks (lm-eval's
zero-shot scoring, checked against lm-eval itself in tests/test_tasks_lm_eval.py) on arc_easy,
arc_challenge, hellaswag, piqa and winogrande, the first --limit validation documents of each (the same
documents for every config, so differences are paired); perplexity on the embedded corpus's held-out
split (in domain: the calibration and training text's) and on LAMBADA's passages (novels: another
domain), every token scored in blocks of 512.

fp32         the model as shipped (its weights are the values of its GGUF: SmolLM2's Q4_1, Gemma's Q4_K_M)
bnb-nf4      bitsandbytes NF4, block 64, double-quantized scales (QLoRA's format), dequantized
nf3          qft NF3, block 64, 8-bit double-quantized scales (rank 0)
lqlora-B     qft LQ-LoRA at B bits (rank 64), data-free (the headline call's default until issue 25)
lqlora-B-fisher          the same, Fisher-weighted (the embedded corpus's train split: quantize_and_prepare's
                         default since issue 25)
lqlora-B-fisher-gptq     ... and the Q step rounded by GPTQ (the same text)
lqlora-4.5-ggml-fisher   LQ-LoRA 4.5 Fisher over llama.cpp's ten block types instead of NF-k (the least
                         SmolLM2 can average over them is 4.03 bits: K types need rows of whole 256-blocks
                         and it is 576 wide): what llama.cpp serves as the base GGUF plus the LoRA GGUF,
                         unmerged (export_gguf, export_gguf_lora; llama.cpp's perplexity of such a pair
                         was within 0.15 % of qft's, RESULTS.md)
peqa-int4    PEQA int4 per channel (trained scales)
int2.1       INT2.1: GPTQ int2-g128 + LoRA rank 32 (alpha 128), trained with LREC (distillation from the
             fp32 model, qft.methods.lrec)
halo-2-fp8   HALO level 2, FP8 matmuls behind Hadamard rotations (full fine-tuning of fp32 master
             weights), scored as it runs: every projection's matmul in FP8

--steps N trains each config N steps on the embedded corpus (the finetune benchmark's schedule: 2 blocks
of 512 tokens, warm-up 3, seed 0; lr 2e-4, PEQA 1e-3, HALO 2e-5) before the evaluation (0: as quantized).
--export int4 also scores what users deploy: export_merged's int4 (W' = dequant(Q) + scaling·B·A rounded
once more, asymmetric, groups of 128 or the largest power of two dividing the input width, GPTQ in
act-order over the corpus's train split, bf16 scales; PEQA's own int4 codes and trained scales as they
are), read back with load_merged; --export int4-rtn the same rounded to nearest instead of GPTQ (no
calibration text, so nothing fitted to one domain). Results go to
benchmarks/out/accuracy/<model>-<config>-<steps>[-<export>].json, one per row (a rerun skips rows already
measured on as many documents; --fresh redoes them).

--fisher-text mixed and --fisher-blocks N change the -fisher configs' calibration (default: 64 blocks of
the corpus, the library's): half the blocks from the corpus and half from CoQA's stories, or more blocks
of the corpus. Their rows get their own files (…-mixed64.json, …-corpus128.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time

import torch
from lqlora import CACHE, OUT, bnb_nf4_model, header

import qft
from qft.exports.merged import dense_model
from qft.files.tasks import FIVE_TASKS, task_data_dir, task_docs
from qft.prepare.report import markdown_table
from qft.quant.formats.ggml import GGML_TYPES
from qft.training.evaluate import perplexity
from qft.training.loop import train
from qft.training.tasks import evaluate_tasks

WORK = OUT / "accuracy"
RANK = 64
CONFIGS = ["fp32", "bnb-nf4", "nf3", "lqlora-4.0", "lqlora-3.0", "lqlora-2.5", "lqlora-4.0-fisher",
           "lqlora-3.0-fisher", "lqlora-2.5-fisher", "lqlora-3.0-fisher-gptq", "lqlora-2.5-fisher-gptq", "peqa-int4",
           "lqlora-4.5-ggml-fisher", "int2.1", "halo-2-fp8"]
LR = {"peqa-int4": 1e-3, "halo-2-fp8": 2e-5}  # the rest train at 2e-4


def coqa_stories() -> list[str]:
    """CoQA's passages, each once: English from five other domains (children's stories, news, Wikipedia,
    literature, school exams), none of them a scored task's documents."""
    path = task_data_dir() / "oe_eval_tasks" / "coqa" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return list(dict.fromkeys(json.loads(line)["doc"]["story"] for line in f))


def fisher_of(model, tokenizer, args) -> dict:
    """The empirical Fisher of the model's projections over --fisher-blocks blocks of --fisher-text, cached."""
    from safetensors.torch import load_file, save_file

    path = WORK / f"fisher-{args.model}-{args.fisher_text}-{args.fisher_blocks}.safetensors"
    if path.is_file():
        return load_file(path)
    targets = qft.find_target_linears(model)
    if args.fisher_text == "corpus":
        fisher = qft.empirical_fisher(model, tokenizer, targets, max_blocks=args.fisher_blocks, progress=False)
    else:  # half the blocks from each text; the Fisher is a mean over blocks, so the halves average
        halves = [qft.empirical_fisher(model, tokenizer, targets, texts, max_blocks=args.fisher_blocks // 2,
                                       progress=False) for texts in (None, coqa_stories())]
        fisher = {k: (halves[0][k] + halves[1][k]) / 2 for k in halves[0]}
    WORK.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(path))
    return fisher


def prepared(name: str, model, tokenizer, args):
    """The config's model (in place where qft quantizes) and the bits per parameter it stores."""
    if name == "fp32":
        return model, 32.0
    if name == "bnb-nf4":
        return bnb_nf4_model(model), 4 + 8 / 64 + 32 / (64 * 256)
    if name == "nf3":
        config = qft.QLoRAConfig(bits="nf3-b64-dq8b256", rank=0)
    elif name.startswith("lqlora-"):
        bits = float(name.split("-")[1])
        config = qft.LQLoRAConfig(bits=bits, rank=RANK, fisher="-fisher" in name,
                                  rounding="gptq" if name.endswith("-gptq") else None,
                                  formats=tuple(GGML_TYPES) if "-ggml" in name else None)
    elif name == "peqa-int4":
        config = qft.PEQAConfig(bits=4)
    elif name == "int2.1":
        config = qft.INT21Config()
    elif name == "halo-2-fp8":
        config = qft.HALOConfig(level=2, precision="fp8")
    else:
        raise ValueError(name)
    fisher = fisher_of(model, tokenizer, args) if getattr(config, "fisher", False) else None
    budget = not isinstance(config, qft.WholeModelConfig)  # HALO has nothing to calibrate
    qft.quantize_(model, config, tokenizer=tokenizer if budget else None, fisher=fisher, cache_dir=CACHE,
                  progress=False)
    return model, model.qft_report.bits


def scored(model, tokenizer, row: dict, lambada: list[str], limit: int) -> dict:
    """``row`` with the five tasks' accuracy, their average and both perplexities (and every score)."""
    if qft.nn.qft_layers(model, (qft.QLinear,)):  # W' = dequant(Q) + scaling·B·A, not dequantized per forward
        model = dense_model(model, torch.float32, merged=True)
    scores = evaluate_tasks(model, tokenizer, FIVE_TASKS, limit=limit, progress=False)
    for task in FIVE_TASKS:
        row[task] = scores[task]["acc_norm" if "acc_norm" in scores[task] else "acc"]
    row["average"] = sum(row[t] for t in FIVE_TASKS) / len(FIVE_TASKS)
    row["ppl in domain"] = perplexity(model, tokenizer, progress=False)
    row["ppl lambada"] = perplexity(model, tokenizer, lambada, progress=False)
    row["scores"] = scores
    return row


def exported_int4(model, tokenizer, rounding: str):
    """What users deploy: the merged int4 export (module doc), read back as a float model."""
    with tempfile.TemporaryDirectory() as folder:
        qft.export_merged(model, folder, tokenizer, symmetric=False, rounding=rounding, progress=False)
        return qft.load_merged(folder).float()


def measure(name: str, args, lambada: list[str]) -> list[dict]:
    """The config's row (as quantized or trained) and, with --export, its export's; each cached in WORK."""
    stem = f"{args.model}-{name}-{args.steps}"
    if "-fisher" in name and (args.fisher_text, args.fisher_blocks) != ("corpus", 64):
        stem += f"-{args.fisher_text}{args.fisher_blocks}"
    paths = [WORK / f"{stem}.json"] + ([WORK / f"{stem}-{args.export}.json"] if args.export else [])
    documents = {"limit": args.limit, "lambada": args.lambada}
    if all(p.is_file() for p in paths) and not args.fresh:
        rows = [json.loads(p.read_text()) for p in paths]
        if all(r.get("documents") == documents for r in rows):
            return rows
    model, tokenizer = qft.named_model(args.model, progress=False)
    start = time.perf_counter()
    model, bits = prepared(name, model, tokenizer, args)
    seconds = time.perf_counter() - start
    if args.steps:
        lrec = name == "int2.1"
        teacher = qft.named_model(args.model, progress=False)[0] if lrec else None
        train(model, tokenizer, steps=args.steps, batch_size=2, block_size=512, lr=LR.get(name, 2e-4), warmup=3,
              seed=0, progress=False, eval_blocks=0, objective="lrec" if lrec else "ce", teacher=teacher)
        del teacher
    row = {"model": args.model, "config": name, "steps": args.steps, "bits/param": bits, "prepare s": seconds,
           "documents": documents}
    if "-fisher" in name:
        row["fisher"] = f"{args.fisher_blocks} blocks of {args.fisher_text}"
    rows = [scored(model, tokenizer, dict(row), lambada, args.limit)]
    if args.export:
        rounding = "rtn" if args.export == "int4-rtn" else "gptq"
        rows.append(scored(exported_int4(model, tokenizer, rounding), tokenizer, {**row, "export": args.export},
                           lambada, args.limit))
    WORK.mkdir(parents=True, exist_ok=True)
    for path, measured in zip(paths, rows):
        path.write_text(json.dumps(measured, indent=1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--limit", type=int, default=500, help="documents of each task (the first ones)")
    parser.add_argument("--lambada", type=int, default=400, help="LAMBADA passages for the out-of-domain perplexity")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--export", choices=["int4", "int4-rtn"], help="also score the config's deployable export")
    parser.add_argument("--fisher-text", choices=["corpus", "mixed"], default="corpus",
                        help="the Fisher's text: the embedded corpus's train split (the library's default), or "
                             "half of it and half CoQA's stories (English from five other domains)")
    parser.add_argument("--fisher-blocks", type=int, default=64, help="blocks of 512 tokens the Fisher reads")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    header()
    print(f"# tasks {FIVE_TASKS}, first {args.limit} documents each (acc_norm where lm-eval reports it, else acc); "
          f"{args.steps} training steps", flush=True)
    torch.manual_seed(0)
    lambada = [d["text"] for d in task_docs("lambada", limit=args.lambada)]
    rows = []
    for name in args.configs:
        for row in measure(name, args, lambada):
            rows.append({k: v for k, v in row.items() if k not in ("scores", "documents")})
            print(rows[-1], flush=True)
    print(markdown_table(rows, ".4f"))


if __name__ == "__main__":
    main()
