"""FSDP2 and DDP on two CPU processes (gloo): tests/distributed_worker.py runs under torchrun and
records, per rank, what is asserted here against a single-process run of the same model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).parent / "distributed_worker.py"
# A deadlock guard, not a speed check: a launch takes about a minute on two CPU cores; one that has not
# ended long after that is stuck in a collective, and waiting on would hang the whole suite.
DEADLINE_S = 15 * 60

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def launch(mode: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(WORKER), mode, str(out)]
    log = out / "torchrun.log"  # a file, not a pipe: a rank left running cannot keep the reader waiting
    with log.open("w") as sink:
        run = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            returncode = run.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            run.terminate()  # torchrun stops its ranks, then itself
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
            pytest.fail(f"torchrun ({mode}) had not ended after {DEADLINE_S} s: a rank is stuck, most likely in a "
                        f"collective the other never reached. The ranks' output:\n{log.read_text()[-9000:]}")
    assert returncode == 0, log.read_text()[-9000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module", params=["fsdp", "ddp"])
def ranks(request, tmp_path_factory):
    return request.param, launch(request.param, tmp_path_factory.mktemp(request.param))


def test_each_rank_holds_half_of_the_packed_codes_under_fsdp(ranks):
    mode, records = ranks
    if mode != "fsdp":
        pytest.skip("DDP replicates")
    for r in records:
        assert r["local codes numel"] * 2 == r["whole codes numel"]


def test_forward_matches_one_process_bit_for_bit(ranks):
    assert all(r["forward bitwise equal"] for r in ranks[1])


def test_gradients_equal_one_process_on_the_combined_batch(ranks):
    for r in ranks[1]:
        assert r["grad names equal"]
        assert r["grad max rel diff"] < 1e-5


def test_frozen_codes_and_scales_unchanged_and_without_gradient(ranks):
    for r in ranks[1]:
        assert r["frozen unchanged"] and r["frozen no grad"]


def test_checkpoint_from_the_run_loads_in_one_process_with_identical_logits(ranks):
    assert all(r["loaded logits equal"] for r in ranks[1])


def test_qft_train_losses_agree_with_one_process(ranks):
    for r in ranks[1]:
        assert r["train losses"] == pytest.approx(r["reference losses"], rel=1e-5)


def test_qft_train_with_gradient_checkpointing_agrees_with_one_process(ranks):
    """Checkpointing is on (backward runs each layer again: on the model inside DDP's wrapper too) and
    the losses are those of one process without it."""
    for r in ranks[1]:
        assert r["checkpointed layer runs"] == 2 * len(r["reference losses"])
        assert r["checkpointed losses"] == pytest.approx(r["reference losses"], rel=1e-5)


def test_qft_train_refuses_an_unwrapped_model_on_several_processes(ranks):
    assert all(r["unwrapped refused"] for r in ranks[1])


def test_transformers_trainer_under_ddp(tmp_path):
    """Trainer wraps the model in DDP itself; after qft.nn.distributed.exclude_frozen the adapters train,
    both ranks hold the same adapters and the quantized weights stay as they were."""
    records = launch("trainer", tmp_path)
    for r in records:
        assert r["adapters moved"] and r["ranks agree"] and r["frozen unchanged"]
