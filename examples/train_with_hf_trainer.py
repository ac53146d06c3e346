"""Train a qft checkpoint with a stock transformers.Trainer instead of qft.train.

    python examples/end_to_end.py                       # writes runs/end_to_end/model
    python examples/train_with_hf_trainer.py runs/end_to_end/model --steps 20 --out runs/hf-trained

With qft imported, AutoModelForCausalLM.from_pretrained reads the checkpoint
(the registered "qft" quantizer) and only the low-rank factors require grad,
so Trainer (or accelerate) updates just those. The result is saved with
qft.save_quantized, so it stays packed. Under `torchrun --nproc-per-node N` Trainer wraps the
model in DDP itself; qft.nn.distributed.exclude_frozen keeps the quantized weights out of DDP's
broadcasts (they are broadcast once), and rank 0 writes the result.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import qft
from qft.files.data import token_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by qft.save_quantized / `qft quantize`")
    parser.add_argument("--data", help="text file or dataset folder (default: the embedded corpus)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--out", default="runs/hf-trained")
    args = parser.parse_args()

    model = qft.nn.distributed.exclude_frozen(AutoModelForCausalLM.from_pretrained(args.checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    blocks = token_blocks(tokenizer, qft.load_texts(args.data, "train", tokenizer=tokenizer), args.block_size)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    print(f"held-out perplexity before: {qft.perplexity(model, tokenizer, max_blocks=12):.2f}")

    training = TrainingArguments(
        output_dir=f"{args.out}-trainer", max_steps=args.steps, per_device_train_batch_size=4, learning_rate=3e-4,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), logging_steps=5, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset)
    trainer.train()

    if trainer.is_world_process_zero():
        print(f"held-out perplexity after: {qft.perplexity(model, tokenizer, max_blocks=12):.2f}")
        qft.save_quantized(model, args.out, tokenizer)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
