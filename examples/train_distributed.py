"""Fine-tune a qft model on several processes: FSDP2 (default) or DDP.

    torchrun --nproc-per-node 2 examples/train_distributed.py --backend gloo          # CPU, FSDP2
    torchrun --nproc-per-node 2 examples/train_distributed.py --backend gloo --ddp    # CPU, DDP
    torchrun --nproc-per-node 8 examples/train_distributed.py                         # 8 GPUs, nccl
    python examples/train_distributed.py --backend gloo                               # one process

Rank 0 quantizes the embedded SmolLM2-135M (Fisher-weighted LQ-LoRA at --bits) and saves it; every rank loads
that checkpoint, so all start from the same model. The other ranks sleep meanwhile, so rank 0 quantizes on every
core this process may use (torchrun gives each rank one thread). To quantize only once, run `qft quantize` before
launching and give its folder as --checkpoint.
FSDP2 gives each rank 1/world of every packed weight and of the adapters; DDP a whole copy.
qft.train splits each batch over the ranks; qft.save_quantized gathers the model and writes one
ordinary checkpoint from rank 0. The final loss is printed last. A rank that waits longer than --timeout
minutes on another (one that has failed or hangs) raises instead of waiting forever.
"""

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import qft


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards under FSDP2 (packed weights as stored)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.nbytes if isinstance(local, qft.QuantizedTensor) else local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Torch on every core this process may run on (torchrun sets OMP_NUM_THREADS=1 per rank), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl", help="nccl (GPUs) or gloo (CPU)")
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    parser.add_argument("--bits", default="2.5", help="LQ-LoRA bit budget, or a format name (e.g. nf4)")
    parser.add_argument("--checkpoint", help="a folder written by `qft quantize` (default: quantize here)")
    parser.add_argument("--workdir", default="train_distributed", help="where the quantized and trained models go")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch (divides by the world size)")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--timeout", type=float, default=30,
                        help="minutes a rank waits on the others (it must cover rank 0's quantization)")
    parser.add_argument("--json", help="also write the run's figures (losses, s/step, peak memory) here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    launched = "RANK" in os.environ  # torchrun / accelerate launch set it
    if launched:
        dist.init_process_group(args.backend, timeout=timedelta(minutes=args.timeout))
    rank = dist.get_rank() if launched else 0
    gpu = args.backend == "nccl" and torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    workdir = Path(args.workdir)

    checkpoint = Path(args.checkpoint) if args.checkpoint else workdir / f"quantized-{args.bits}"
    if rank == 0 and not (checkpoint / "config.json").is_file():
        with every_core():
            model, tokenizer = qft.default_model(progress=not args.quiet)
            bits = args.bits if args.bits.startswith(("nf", "int", "fp")) else float(args.bits)
            qft.quantize_and_prepare(model, bits=bits, fisher=True, tokenizer=tokenizer, progress=not args.quiet)
            qft.save_quantized(model, checkpoint, tokenizer)
    if launched:
        dist.barrier()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = qft.load_quantized(checkpoint, device)

    if launched:
        model = qft.replicate(model) if args.ddp else qft.shard(model)
    result = qft.train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                       lr=args.lr, eval_blocks=0, progress=not args.quiet and rank == 0)
    start = time.perf_counter()
    qft.save_quantized(model, workdir / "trained", tokenizer)
    save_s = time.perf_counter() - start

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = torch.tensor([float(peak), float(held_bytes(model))], dtype=torch.float64, device=device)
    per_rank = mine[None]
    if launched:
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        per_rank = torch.stack(gathered)
    peaks, held = per_rank[:, 0].cpu(), per_rank[:, 1].cpu()
    if rank == 0:
        figures = {"mode": "ddp" if args.ddp and launched else ("fsdp2" if launched else "1 process"),
                   "world": dist.get_world_size() if launched else 1, "losses": result.losses,
                   "s/step": result.seconds_per_step, "save s": save_s,
                   "peak RSS per rank GB": [round(float(p) / 1e9, 3) for p in peaks],
                   "parameters held per rank GB": [round(float(h) / 1e9, 4) for h in held],
                   "peak GPU GB": torch.cuda.max_memory_allocated(device) / 1e9 if gpu else None}
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        print(f"peak memory per rank: {figures['peak RSS per rank GB']} GB (RSS), {result.seconds_per_step:.2f} s/step")
        print(f"final loss {result.losses[-1]:.4f}")
    if launched:
        # the DDP wrapper goes first: its reducer, left holding the last reference to a gloo process group,
        # destroys it at exit while holding the GIL and can wait forever on a gloo thread that needs the GIL
        del model
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
