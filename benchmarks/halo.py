"""HALO on SmolLM2-135M: the three matmuls' error per level and precision, and fine-tuning.

    python benchmarks/halo.py                          # both parts
    python benchmarks/halo.py --part errors
    python benchmarks/halo.py --part finetune --runs full-bf16 full-halo2-int8
    python benchmarks/halo.py --part inference

errors: real activations X and output gradients E of the projections of decoder layers 0, 10,
20 and 29 (28 matrices), captured from one fp32 training batch (2 blocks of 512 tokens of the
corpus's train split). For each precision, level and scale granularity: the relative Frobenius
error of Y = XWᵀ, dX = EW and dW = EᵀX against fp32 (mean and worst over the matrices).

finetune: the finetune benchmark's data, steps and schedule (30 x 2 blocks of 512, warm-up 3,
cosine, seed 0), each run in its own process, held-out perplexity over every 512-token block (for
HALO runs also with the trained weights in fp32 matmuls: what training reached, apart from what the
8-bit matmuls cost at inference):
  full-*    the projections' weights and biases train (embeddings and norms frozen), lr --full-lr:
            fp32, bf16 (autocast), HALO-0/1/2 in FP8 and in INT8 (per-tensor scales, fp32 master weights)
  peft-*    LoRA rank 64, alpha 64 on every projection, lr --lr: PEFT's LoRA on the fp32 model (peft-fp32),
            under bf16 autocast (peft-bf16), HALO-PEFT (8-bit frozen base, fp32 LoRA) 0/1/2 in FP8 and INT8
Rows are merged by run into benchmarks/out/halo-finetune.json; the loss curves of every run there
are drawn in docs/halo-loss.png.

inference: seconds of one forward over a block of 512 tokens, fp32 against full HALO-2 (FP8 and INT8)
under no_grad (each layer's rotated, cast weight kept from the first call) and with gradients on (the
weight rotated and cast in every call, as every forward did before that cache); the median of 3 calls,
interleaved, in one process. Then one product at SmolLM2's shapes: torch's CPU torch._scaled_mm and
torch._int_mm against the emulation qft runs on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from finetune import RANK, PeakRSS, peft_lora, run_children, training_arguments
from lqlora import OUT, header

import qft
from qft.files.data import default_corpus, token_blocks
from qft.training.evaluate import perplexity
from qft.exports.merged import dense_model
from qft.nn import HaloSettings
from qft.kernels.low_precision import quantize, scaled_matmul
from qft.nn.halo import halo_matmul
from qft.prepare.report import markdown_table

LEVELS = (0, 1, 2)
PRECISIONS = ("fp8", "int8")
RUNS = ([f"full-{p}" for p in ("fp32", "bf16")] + [f"full-halo{lv}-{p}" for p in PRECISIONS for lv in LEVELS]
        + [f"peft-{p}" for p in ("fp32", "bf16")] + [f"peft-halo{lv}-{p}" for p in PRECISIONS for lv in LEVELS])
ERROR_LAYERS = (0, 10, 20, 29)
FINETUNE_JSON = OUT / "halo-finetune.json"
PICTURE = Path(__file__).parent.parent / "docs" / "halo-loss.png"


def capture(model, tokenizer) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, X, W, E) of the chosen projections over one training batch."""
    wanted = {n: m for n, m in qft.find_target_linears(model).items()
              if any(f"layers.{i}." in n for i in ERROR_LAYERS)}
    seen: dict[str, list] = {}

    def hook(name):
        def forward(module, inputs, output):
            seen[name] = [inputs[0].detach().reshape(-1, inputs[0].shape[-1])]
            output.register_hook(lambda grad: seen[name].append(grad.detach().reshape(-1, grad.shape[-1])))
        return forward

    handles = [m.register_forward_hook(hook(n)) for n, m in wanted.items()]
    blocks = token_blocks(tokenizer, default_corpus()["train"]["text"], 512)[:2]
    model(input_ids=blocks, labels=blocks).loss.backward()
    for h in handles:
        h.remove()
    return [(n, seen[n][0], wanted[n].weight.detach(), seen[n][1]) for n in wanted]


def part_errors() -> None:
    header()
    model, tokenizer = qft.default_model(progress=False)
    captured = capture(model, tokenizer)
    print(f"# {len(captured)} matrices, {captured[0][1].shape[0]} tokens", flush=True)
    rows = []
    for precision in PRECISIONS:
        for granularity in ("tensor", "row"):
            for level in LEVELS:
                settings = HaloSettings(level, precision, granularity)
                errors = {"Y": [], "dX": [], "dW": []}
                for _, x, w, e in captured:
                    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
                    y = halo_matmul(x, w, settings)
                    y.backward(e)
                    for key, ours, ref in (("Y", y, x @ w.t()), ("dX", x.grad, e @ w), ("dW", w.grad, e.t() @ x)):
                        errors[key].append(float((ours.detach() - ref.detach()).norm() / ref.detach().norm()))
                row = {"precision": precision, "scales per": granularity, "level": f"HALO-{level}"}
                for key, values in errors.items():
                    row[f"{key} mean"] = sum(values) / len(values)
                    row[f"{key} worst"] = max(values)
                rows.append(row)
                print(row, flush=True)
    (OUT / "halo-errors.json").write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows, ".4f"))


def prepare(run: str, model):
    """The model of ``run`` with what trains marked; (model, train precision, lr kind)."""
    kind, _, rest = run.partition("-")
    if rest in ("fp32", "bf16"):
        if kind == "peft":
            return peft_lora(model), rest
        targets = qft.find_target_linears(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in targets.values():
            for p in layer.parameters():
                p.requires_grad_(True)
        return model, rest
    level, precision = int(rest[4]), rest.split("-")[1]
    peft = dict(peft=True, rank=RANK, alpha=RANK) if kind == "peft" else {}
    return qft.quantize_and_prepare(model, method="halo", level=level, precision=precision, progress=False,
                                    **peft), "fp32"


def one_run(args) -> dict:
    run = args.runs[0]
    torch.manual_seed(0)
    model, tokenizer = qft.default_model(progress=False)
    start = time.perf_counter()
    model, precision = prepare(run, model)
    prepare_s = time.perf_counter() - start
    lr = args.full_lr if run.startswith("full") else args.lr
    before = perplexity(model, tokenizer, progress=False)
    with PeakRSS() as rss:
        result = qft.train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=512, lr=lr,
                           warmup=args.warmup, seed=0, progress=False, eval_blocks=0, precision=precision)
    after = perplexity(model, tokenizer, progress=False)
    # what training reached, apart from 8-bit inference: the trained weights in fp32 matmuls
    exact = after if "halo" not in run else perplexity(dense_model(model, torch.float32, merged=True), tokenizer,
                                                       progress=False)
    return {"run": run, "lr": lr, "ppl before": before, "ppl after": after, "ppl after, fp32 matmuls": exact,
            "first loss": result.losses[0], "last loss": result.losses[-1], "s/step": result.seconds_per_step,
            "trainable params": result.trainable_parameters, "peak RSS training GB": rss.peak / 1e9,
            "prepare s": prepare_s, "losses": result.losses}


def draw(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("full", "peft")):
        for row in rows:
            if row["run"].startswith(kind):
                style = "--" if "int8" in row["run"] else "-"
                ax.plot(range(1, len(row["losses"]) + 1), row["losses"], style, label=row["run"])
        ax.set_title({"full": "full fine-tuning (projections)", "peft": "PEFT (LoRA r64)"}[kind])
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(PICTURE, dpi=110)


def part_finetune(args) -> None:
    rows = run_children(__file__, args, extra=("--full-lr", str(args.full_lr)))
    merged = {r["run"]: r for r in json.loads(FINETUNE_JSON.read_text())} if FINETUNE_JSON.exists() else {}
    merged.update({r["run"]: r for r in rows})
    ordered = [merged[r] for r in RUNS if r in merged]
    FINETUNE_JSON.write_text(json.dumps(ordered, indent=1))
    print(markdown_table([{k: v for k, v in r.items() if k != "losses"} for r in ordered], ".3f"))
    draw(ordered)


def part_inference() -> None:
    model, tokenizer = qft.default_model(progress=False)
    blocks = token_blocks(tokenizer, default_corpus()["train"]["text"], 512)[:1]
    models = {"fp32": model}
    for precision in PRECISIONS:
        models[f"halo2-{precision}"] = qft.quantize_and_prepare(copy.deepcopy(model), method="halo", level=2,
                                                                precision=precision, progress=False)
    seconds: dict[tuple[str, bool], list[float]] = {}
    for _ in range(3):
        for name, m in models.items():
            for grad in ((False, True) if name != "fp32" else (False,)):
                with torch.set_grad_enabled(grad):
                    start = time.perf_counter()
                    m(blocks)
                    seconds.setdefault((name, grad), []).append(time.perf_counter() - start)
    fp32 = statistics.median(seconds[("fp32", False)])
    rows = [{"model": name, "forward": "with gradients" if grad else "no_grad", "s": statistics.median(times),
             "× fp32": statistics.median(times) / fp32} for (name, grad), times in seconds.items()]
    print(markdown_table(rows, ".3f"))
    print(markdown_table(cpu_products(), ".2f"))


def cpu_products() -> list[dict]:
    """ms of one product at SmolLM2's shapes: torch's CPU 8-bit kernels against the emulation qft runs on CPU
    (the cast values in a float32 matmul); the median of 7, interleaved."""
    rows = []
    for m, k, n in ((512, 576, 1536), (512, 1536, 576), (512, 576, 576)):
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        (fa, sfa), (fb, sfb) = quantize(a, "fp8"), quantize(b, "fp8")
        (ia, sia), (ib, sib) = quantize(a, "int8"), quantize(b, "int8")
        runs = {"fp8 torch._scaled_mm": lambda: torch._scaled_mm(fa, fb.t(), scale_a=sfa, scale_b=sfb,
                                                                 out_dtype=torch.float32),
                "fp8 emulated": lambda: scaled_matmul(fa, sfa, fb, sfb),
                "int8 torch._int_mm": lambda: torch._int_mm(ia, ib.t()).float() * sia * sib,
                "int8 emulated": lambda: scaled_matmul(ia, sia, ib, sib)}
        times: dict[str, list[float]] = {}
        for _ in range(7):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times.setdefault(name, []).append(1e3 * (time.perf_counter() - start))
        medians = {f"{name} ms": statistics.median(t) for name, t in times.items()}
        rows.append({"X @ Wᵀ": f"({m}, {k}) @ ({k}, {n})", **medians})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["errors", "finetune", "inference", "all"], default="all")
    training_arguments(parser, RUNS)
    parser.add_argument("--full-lr", type=float, default=2e-5, help="the full fine-tuning runs' learning rate")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args)), flush=True)
        return
    if args.part in ("errors", "all"):
        part_errors()
    if args.part in ("finetune", "all"):
        part_finetune(args)
    if args.part in ("inference", "all"):
        part_inference()


if __name__ == "__main__":
    main()
