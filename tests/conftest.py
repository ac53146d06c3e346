import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.
# Set before any kernel is defined (kernels read it when decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Every format family, with odd block/group choices, used across the tests.
ALL_FORMATS = [
    "nf2-b16", "nf3-b32", "nf4-b64", "nf8-b64",
    "nf4-b64-dq8b256", "nf3-b16-dq2b16-fp16", "nf2-b32-dq4b64", "nf8-b16-dq3b256-fp16",
    "int2-g16", "int3-g32", "int4-g128", "int5-g64", "int6-ch", "int7-g256", "int8-ch",
    "fp8-e4m3-row", "fp8-e4m3-tensor", "fp8-e5m2-row", "fp8-e5m2-tensor",
]


@pytest.fixture
def rng():
    """A fresh generator per test: inputs differ run to run; a failure prints its seed, and
    QFT_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("QFT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"rng seed {seed} (replay: QFT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
