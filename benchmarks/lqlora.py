"""LQ-LoRA on the embedded SmolLM2-135M: perplexity, reconstruction, allocation, error table.

    python benchmarks/lqlora.py ppl      # held-out perplexity before training, in domain and on novels
                                         # (LAMBADA's passages: the guard for allocation changes), peers side by side
    python benchmarks/lqlora.py recon    # reconstruction error: plain NF, LoftQ (1 step), LQ-LoRA
    python benchmarks/lqlora.py ilp      # solver time and gap: real table, LLaMA-2-7B/70B-shaped tables
    python benchmarks/lqlora.py table    # time to fill the error table; cheap vs full table choices
    python benchmarks/lqlora.py alloc    # cold table time and quality vs the cell-by-cell estimate; ILP per budget

Each part prints Markdown tables; the error tables are cached under benchmarks/out/cache.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from qft.solvers.mckp import solve

import qft
from qft.prepare.allocate import ErrorTable, allocate, error_table, nf_grid, pruned_grid, undominated
from qft.methods.lqlora import low_rank, lqlora, rank1_weights
from qft.training.evaluate import perplexity
from qft.prepare.fisher import empirical_fisher
from qft.prepare.quantize import quantize_and_prepare
from qft.prepare.report import markdown_table
from qft.quant.tensor import QuantizedTensor

OUT = Path(__file__).parent / "out"
CACHE = OUT / "cache"
BUDGETS = [2.5, 2.75, 3.0, 3.5]
RANK = 64


def header() -> None:
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)


def target_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in qft.find_target_linears(model).items()}


def fisher_of(model, tokenizer):
    path = CACHE / "fisher.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        return load_file(path)
    from safetensors.torch import save_file

    fisher = empirical_fisher(model, tokenizer, qft.find_target_linears(model), progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(path))
    return fisher


def bnb_nf4_model(model):
    """The model with every target weight replaced by bitsandbytes' NF4 (block 64, QLoRA's double quant)."""
    import bitsandbytes.functional as bnbf

    model = copy.deepcopy(model)
    for layer in qft.find_target_linears(model).values():
        packed, state = bnbf.quantize_4bit(layer.weight.data, quant_type="nf4", blocksize=64, compress_statistics=True)
        layer.weight.data = bnbf.dequantize_4bit(packed, state)
    return model


def part_ppl(args) -> None:
    """In domain (the corpus the Fisher is measured on) and out of it: a Fisher or an allocation that over-fits
    the calibration text shows only in the second column (issue 25)."""
    from qft.exports.merged import dense_model
    from qft.files.tasks import task_docs

    model, tok = qft.default_model()
    novels = [d["text"] for d in task_docs("lambada", limit=400)]
    rows = []

    def row(name, bits, m, seconds=0.0, extra=""):
        start = time.perf_counter()
        if qft.nn.qft_layers(m):  # the same weights, dequantized once instead of per forward
            m = dense_model(m, torch.float32, merged=True)
        ppl = perplexity(m, tok, progress=False)
        rows.append({"model": name, "bits/param": bits, "held-out ppl": ppl,
                     "novels ppl": perplexity(m, tok, novels, progress=False),
                     "prepare s": seconds, "eval s": time.perf_counter() - start, "note": extra})
        print(rows[-1], flush=True)

    row("full precision (fp32)", "32", model)
    row("bitsandbytes NF4, block 64 (QLoRA double quant)", f"{4 + 8 / 64 + 32 / (64 * 256):.3f}", bnb_nf4_model(model))
    for name in ("nf3-b64-dq8b256", "nf2-b64-dq8b256"):
        start = time.perf_counter()
        m = quantize_and_prepare(copy.deepcopy(model), bits=name, method="qlora", rank=0, progress=False)
        row(f"uniform {name} (qft)", f"{m.qft_report.bits:.3f}", m, time.perf_counter() - start)
    fisher = fisher_of(model, tok) if args.fisher else None
    for use_fisher in ([False, True] if args.fisher else [False]):
        for bits in args.budgets:
            start = time.perf_counter()
            m = quantize_and_prepare(copy.deepcopy(model), bits=bits, rank=RANK, fisher=fisher if use_fisher else False,
                                     cache_dir=CACHE, progress=False)
            r = m.qft_report
            row(f"qft LQ-LoRA {bits} bits, rank {RANK}" + (", Fisher" if use_fisher else ""),
                f"{r.bits:.3f} (+{r.bits_with_adapters - r.bits:.2f} adapters)", m, time.perf_counter() - start,
                f"{r.solution.solver} {r.solution.status}, gap {r.solution.gap:.1e}")
            if args.heatmap and bits == 2.5:
                from qft.prepare.plot import bits_heatmap

                bits_heatmap(r, OUT / f"bits-{bits}{'-fisher' if use_fisher else ''}.png")
    print(markdown_table(rows, ".3f"))


def part_recon(args) -> None:
    model, _ = qft.default_model()
    weights = target_weights(model)
    norm2 = sum(float(w.pow(2).sum()) for w in weights.values())
    rows = []
    for fmt in ("nf4-b64-dq8b256", "nf3-b64-dq8b256", "nf2-b64-dq8b256"):
        results = {}
        for method, kwargs in (("LoftQ, 1 step (as PEFT)", {"iters": 1, "init": "zero"}),
                               ("LQ-LoRA (<= 10 iterations)", {"iters": 10, "init": "svd"})):
            start, err2 = time.perf_counter(), 0.0
            for w in weights.values():
                err2 += lqlora(w, fmt, RANK, **kwargs).error
            results[method] = (math.sqrt(err2 / norm2), time.perf_counter() - start)
        plain = sum(float((QuantizedTensor.quantize(w, fmt).dequantize() - w).pow(2).sum()) for w in weights.values())
        rows.append({"format": fmt, "plain NF": math.sqrt(plain / norm2),
                     **{k: v[0] for k, v in results.items()},
                     **{f"{k} s": v[1] for k, v in results.items()}})
        print(rows[-1], flush=True)
    print(f"relative Frobenius error ||W - Q - L1L2|| / ||W|| over all {len(weights)} matrices, rank {RANK}")
    print(markdown_table(rows))


def _llama_costs(layers: int, hidden: int, kv: int, inter: int, grid) -> tuple[np.ndarray, np.ndarray]:
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)] * layers
    costs = np.array([[f.storage_bits(*s) for f in grid] for s in shapes], dtype=np.float64)
    return costs, np.array([r * c for r, c in shapes], dtype=np.float64)


def part_ilp(args) -> None:
    model, _ = qft.default_model()
    weights = target_weights(model)
    grid = nf_grid()
    table = error_table(weights, pruned_grid(weights, RANK, cache_dir=CACHE, progress=False), RANK,
                        cache_dir=CACHE, progress=False)
    rows = []

    def run(name, errors, costs, numel, solver, bits):
        sol = solve(errors, costs, bits * numel.sum(), solver=solver, time_limit=120)
        rows.append({"table": name, "shape": f"{errors.shape[0]}x{errors.shape[1]}", "budget": bits,
                     "solver": sol.solver, "status": sol.status, "seconds": sol.seconds, "gap": sol.gap,
                     "bits": sol.cost / numel.sum()})
        print(rows[-1], flush=True)

    for bits in BUDGETS:
        for solver in ("auto", "scipy", "lagrangian"):
            run("SmolLM2 (pruned grid)", table.errors, table.costs, table.numel, solver, bits)

    # Synthetic LLaMA-2 tables over the whole 300-format grid: the real per-format error
    # profile (normalised per matrix) times a per-matrix scale and 5 % noise.
    full = error_table(weights, grid, RANK, cache_dir=CACHE, progress=False) if args.full_grid else None
    rng = np.random.default_rng(0)
    profile = (full.errors / full.errors.mean(axis=1, keepdims=True)) if full is not None else None
    for name, dims in (("LLaMA-2-7B", (32, 4096, 4096, 11008)), ("LLaMA-2-70B", (80, 8192, 1024, 28672))):
        costs, numel = _llama_costs(*dims, grid)
        if profile is None:
            bits_per = costs / numel[:, None]
            base = np.exp(-1.1 * bits_per)  # error ~ 2^(-1.6 b): a stand-in when the full table is not built
        else:
            base = profile[rng.integers(0, profile.shape[0], len(numel))]
        errors = base * numel[:, None] * rng.lognormal(0, 1, (len(numel), 1)) * rng.uniform(0.95, 1.05, base.shape)
        for bits in (2.5, 3.0):
            for solver in ("auto", "lagrangian"):
                run(name, errors, costs, numel, solver, bits)
    print(markdown_table(rows, ".4g"))


def part_table(args) -> None:
    model, _ = qft.default_model()
    weights = target_weights(model)
    start = time.perf_counter()
    cpu0 = time.process_time()
    grid = pruned_grid(weights, RANK, cache_dir=False, progress=False)
    t_prune = time.perf_counter() - start
    table = error_table(weights, grid, RANK, cache_dir=False, progress=False)
    wall = time.perf_counter() - start
    print(f"error table, whole model: {len(nf_grid())} formats -> {len(grid)} after dominance on 14 matrices "
          f"({t_prune:.0f} s); {len(weights)} x {len(grid)} table in {wall:.0f} s wall, "
          f"{time.process_time() - cpu0:.0f} s CPU ({(time.process_time() - cpu0) / wall:.2f} cores busy)", flush=True)
    print(f"undominated on the whole model: {len(undominated(table))} of {len(grid)}")

    # cheap (row-strided residual) vs exact (row_stride=1) vs full LQ-LoRA decomposition, on one layer
    layer = args.layer
    sub = {n: w for n, w in weights.items() if f".{layer}." in n}
    cols = [f for f in grid]
    cheap = error_table(sub, cols, RANK, cache_dir=CACHE, progress=False)
    exact_rows = error_table(sub, cols, RANK, row_stride=1, cache_dir=CACHE, progress=False)
    start = time.perf_counter()
    full = np.array([[lqlora(w, f, RANK, iters=args.iters).error for f in cols] for w in sub.values()])
    print(f"full decomposition table for layer {layer}: {full.size} cells in {time.perf_counter() - start:.0f} s "
          f"({args.iters} iterations at most)", flush=True)
    full_table = copy.copy(cheap)
    full_table.errors = full
    rows = []
    for bits in BUDGETS:
        best_formats, best = allocate(full_table, bits)
        for name, t in (("cheap (stride 4)", cheap), ("cheap (all rows)", exact_rows)):
            formats, _ = allocate(t, bits)
            picked = [cols.index(f) for f in formats]
            true_error = float(full[np.arange(len(picked)), picked].sum())
            rows.append({"budget": bits, "table": name,
                         "same choice": f"{sum(a == b for a, b in zip(formats, best_formats))}/{len(formats)}",
                         "full-table error of its choice vs optimum": true_error / best.objective - 1})
            print(rows[-1], flush=True)
    print(markdown_table(rows, ".4f"))


def reference_errors(weights, formats, fisher, row_stride: int = 4) -> np.ndarray:
    """The table's estimate as first written, cell by cell: quantize, store and dequantize each
    strided residual on its own (no work shared across formats). Cached under benchmarks/out/cache."""
    h = hashlib.sha256(str([f.name for f in formats]).encode() + str(list(weights)).encode())
    path = CACHE / f"reference-{'fisher-' if fisher else ''}{h.hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    errors = np.zeros((len(weights), len(formats)))
    for i, (name, w) in enumerate(weights.items()):
        w = w.float()
        f = None if fisher is None else fisher[name].float()
        l1, l2, _ = low_rank(w, RANK, torch.Generator().manual_seed(0), None if f is None else rank1_weights(f))
        residual = (w - l1 @ l2)[::row_stride]
        importance = 1.0 if f is None else f[::row_stride]
        for j, fmt in enumerate(formats):
            diff = residual - QuantizedTensor.quantize(residual, fmt).dequantize()
            errors[i, j] = w.shape[0] / residual.shape[0] * float((importance * diff * diff).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, errors)
    return errors


def part_alloc(args) -> None:
    model, tok = qft.default_model()
    weights = target_weights(model)
    names = list(weights)
    table_rows, quality_rows, ilp_rows = [], [], []
    for use_fisher in (False, True) if args.fisher else (False,):
        fisher = fisher_of(model, tok) if use_fisher else None
        tag = "Fisher" if use_fisher else "plain"
        start, cpu = time.perf_counter(), time.process_time()
        grid = pruned_grid(weights, RANK, fisher=fisher, cache_dir=False, progress=False)
        pruned = time.perf_counter() - start
        table = error_table(weights, grid, RANK, fisher=fisher, cache_dir=False, progress=False)
        wall = time.perf_counter() - start
        table_rows.append({"errors": tag, "formats kept": f"{len(grid)} of {len(nf_grid())}", "prune s": pruned,
                           "table s (cold, prune included)": wall, "CPU s": time.process_time() - cpu})
        print(table_rows[-1], flush=True)

        # the cell-by-cell estimate: its own pruning on the same sample, then its table on both grids
        picks = [names[i] for i in np.linspace(0, len(names) - 1, 14).round().astype(int)]
        sample = {n: weights[n] for n in dict.fromkeys(picks)}
        sample_errors = reference_errors(sample, nf_grid(), fisher)
        sample_costs = np.array([[f.storage_bits(*w.shape) for f in nf_grid()] for w in sample.values()], dtype=float)
        kept = undominated(ErrorTable(list(sample), nf_grid(), sample_errors, sample_costs, np.ones(len(sample))))
        ref_grid = [nf_grid()[c] for c in kept]
        both = list(dict.fromkeys(ref_grid + grid))
        ref = ErrorTable(names, both, reference_errors(weights, both, fisher),
                         np.array([[f.storage_bits(*w.shape) for f in both] for w in weights.values()], dtype=float),
                         table.numel)
        in_ref = [both.index(f) for f in ref_grid]
        ref_own = ErrorTable(names, ref_grid, ref.errors[:, in_ref], ref.costs[:, in_ref], ref.numel)
        same_cells = ref.errors[:, [both.index(f) for f in grid]]
        print(f"{tag}: same pruned grid as the cell-by-cell estimate: {ref_grid == grid}; largest relative "
              f"difference of a cell: {np.max(np.abs(table.errors - same_cells) / same_cells):.2e}", flush=True)
        for bits in BUDGETS:  # the old allocation: cell-by-cell table, the old solver gap 1e-6
            old = solve(ref_own.errors, ref_own.costs, bits * ref.numel.sum(), gap=1e-6)
            chosen, _ = allocate(table, bits)
            picked = [both.index(f) for f in chosen]
            error = float(ref.errors[np.arange(len(names)), picked].sum())
            quality_rows.append({"errors": tag, "budget": bits, "old allocation's error": old.objective,
                                 "new allocation's (cell-by-cell) error": error, "relative": error / old.objective - 1})
            print(quality_rows[-1], flush=True)

        for bits in BUDGETS:
            for solver, gap in (("auto", 1e-4), ("cbc", 1e-4), ("scipy", 1e-4), ("cbc", 1e-6), ("scipy", 1e-6)):
                sol = solve(table.errors, table.costs, bits * table.numel.sum(), solver=solver, gap=gap, time_limit=60)
                ilp_rows.append({"errors": tag, "budget": bits, "solver": solver, "gap asked": gap,
                                 "ran": sol.solver, "status": sol.status, "seconds": sol.seconds, "gap": sol.gap,
                                 "objective": sol.objective})
                print(ilp_rows[-1], flush=True)
    print(markdown_table(table_rows, ".1f"))
    print()
    print(markdown_table(quality_rows, ".6g"))
    print()
    print(markdown_table(ilp_rows, ".3g"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["ppl", "recon", "ilp", "table", "alloc"])
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--fisher", action="store_true", help="ppl, alloc: also the Fisher-weighted runs")
    parser.add_argument("--heatmap", action="store_true", help="ppl: draw the 2.5-bit allocation")
    parser.add_argument("--full-grid", action="store_true", help="ilp: synthetic tables from the real 300-format table")
    parser.add_argument("--layer", type=int, default=12, help="table: the layer compared against full decompositions")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    header()
    {"ppl": part_ppl, "recon": part_recon, "ilp": part_ilp, "table": part_table, "alloc": part_alloc}[args.part](args)


if __name__ == "__main__":
    main()
