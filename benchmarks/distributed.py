"""FSDP2 and DDP on 2 processes against 1, on SmolLM2 at 2.5 bits: losses, s/step, memory per rank.

    python benchmarks/distributed.py [--steps 10] [--backend gloo]

Runs examples/train_distributed.py three times on the same quantized checkpoint (Fisher-weighted
LQ-LoRA 2.5, made once in benchmarks/out/distributed/): one process, then `torchrun
--nproc-per-node 2` with FSDP2 and with DDP. Same global batch (4 blocks of 512 tokens), data,
seed and schedule; each rank takes half of every batch. On this 2-core CPU each of the two ranks
runs one thread and the single process two, so s/step compares the same cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lqlora import OUT, header

from qft.prepare.report import markdown_table

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_distributed.py"
WORK = OUT / "distributed"


def run(mode: str, args) -> dict:
    out = WORK / f"{mode}.json"
    common = [str(EXAMPLE), "--backend", args.backend, "--steps", str(args.steps), "--workdir", str(WORK),
              "--json", str(out), "--quiet"]
    if mode == "1 process":
        command = [sys.executable, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *common]
        command += ["--ddp"] if mode == "ddp" else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()
    header()
    WORK.mkdir(parents=True, exist_ok=True)
    results = [run(mode, args) for mode in ("1 process", "fsdp2", "ddp")]
    reference = results[0]["losses"]
    rows = []
    for r in results:
        rows.append({"mode": r["mode"], "world": r["world"], "first loss": r["losses"][0], "last loss": r["losses"][-1],
                     "max |loss - 1 process|": max(abs(a - b) for a, b in zip(r["losses"], reference)),
                     "s/step": r["s/step"], "peak RSS per rank GB": " / ".join(f"{p:.2f}" for p in r["peak RSS per rank GB"]),
                     "parameters per rank MB": " / ".join(f"{1e3 * p:.1f}" for p in r["parameters held per rank GB"]),
                     "save s": r["save s"]})
        print(r, flush=True)
    print(markdown_table(rows, ".4g"))
    (OUT / "distributed.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
