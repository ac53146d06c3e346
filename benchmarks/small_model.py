"""Fixed overheads: `quantize_and_prepare(bits=3.0)` on a tiny random Qwen2, in a fresh process.

    python benchmarks/small_model.py          # 3 fresh processes, each timed from after the imports

A 2-layer, 128-wide model (14 matrices) quantizes in well under a second unless something does
per-call work that does not scale with the model (solver start-up, grid set-up, table filling).
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
import qft
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
start = time.perf_counter()
qft.quantize_and_prepare(model, bits=3.0, cache_dir=False, progress=False)
s = model.qft_report.solution
print(f"{time.perf_counter() - start:.3f} s, {len(model.qft_report.matrices)} matrices, allocation {s.solver} {s.status} "
      f"gap {s.gap:.1e}")
"""


def main() -> None:
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        print("quantize_and_prepare(bits=3.0), 2-layer 128-wide Qwen2:", out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
