"""One rank of tests/test_distributed.py: run with
``torchrun --nproc-per-node 2 tests/distributed_worker.py fsdp|ddp|trainer OUT_DIR`` (gloo).

Every rank builds the same tiny prepared model, computes the single-process reference (logits,
the gradients of the combined batch, qft.train's losses) on an unwrapped copy, then shards (FSDP2)
or replicates (DDP) the model and records what the test asserts, in OUT_DIR/rank{R}.json.
"""

import copy
import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_llama  # noqa: E402

import qft  # noqa: E402
from qft.quant.tensor import QuantizedTensor  # noqa: E402

# a rank that waits this long for the other raises (and torchrun stops both) instead of hanging the test
TIMEOUT = timedelta(minutes=5)
# qft.train's settings, in one process (the reference) and on both ranks
TRAIN = dict(steps=3, batch_size=4, lr=1e-3, warmup=0, eval_blocks=0, max_grad_norm=0, progress=False)


def prepared():
    model = tiny_llama(seed=0)
    return qft.quantize_and_prepare(model, bits="nf3-b64", method="qlora", rank=4, progress=False)


def wrap(model, mode: str):
    return qft.shard(model) if mode == "fsdp" else qft.replicate(model)


def finish() -> None:
    """Tear the process group down once no DDP wrapper is left (callers drop theirs first): a DDP reducer left
    holding the last reference to a gloo group destroys it at exit holding the GIL, and can hang there."""
    gc.collect()
    dist.destroy_process_group()


def trainable_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in qft.nn.distributed.unwrap(model).named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def frozen_inner(model) -> dict[str, torch.Tensor]:
    """Every inner tensor of every quantized weight, gathered whole."""
    with qft.gathered(model) as m:
        return {f"{n}/{k}": t.clone() for n, p in m.named_parameters() if isinstance(p, QuantizedTensor)
                for k, t in p.inner_tensors().items()}


def with_trainer(out: Path) -> None:
    """transformers.Trainer wraps the model in DDP itself: qft.nn.distributed.exclude_frozen first."""
    from transformers import Trainer, TrainingArguments

    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    model = qft.nn.distributed.exclude_frozen(prepared())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = frozen_inner(model)
    torch.manual_seed(0)
    blocks = torch.randint(0, 300, (16, 32)).tolist()
    data = [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in blocks]
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                             ddp_backend="gloo", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    theirs = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(theirs, mine)
    record = {"rank": rank, "adapters moved": max(moved.values()) > 0,
              "ranks agree": all(torch.equal(t, theirs[0]) for t in theirs),
              "frozen unchanged": all(torch.equal(frozen_inner(model)[k], v) for k, v in frozen.items())}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "trainer":
        return with_trainer(out)
    torch.manual_seed(0)
    batch = torch.randint(0, 300, (4, 32))

    # the single-process reference, before the process group exists
    reference = prepared()
    with torch.no_grad():
        ref_logits = reference(input_ids=batch).logits
    ref_model = copy.deepcopy(reference)
    ref_model.train()
    ref_model(input_ids=batch, labels=batch).loss.backward()
    ref_grads = trainable_grads(ref_model)
    single = copy.deepcopy(reference)
    ref_losses = qft.train(single, None, batch, **TRAIN).losses

    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batch.tensor_split(world)[rank]
    record: dict = {"rank": rank, "world": world}
    try:  # an unwrapped model would train each rank on its own half without syncing: refused
        qft.train(prepared(), None, batch, steps=1, batch_size=4, eval_blocks=0, progress=False)
        record["unwrapped refused"] = False
    except ValueError as e:
        record["unwrapped refused"] = "neither sharded nor replicated" in str(e)
    model = prepared()
    before = {n: t.clone() for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)
              for n, t in [(f"{n}/{k}", t) for k, t in p.inner_tensors().items()]}
    wrapped = wrap(model, mode)
    if mode == "fsdp":
        local = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
        whole = before[next(k for k in before if k.endswith("q_proj.weight/codes"))]
        record["local codes numel"] = local.to_local().codes.numel()
        record["whole codes numel"] = whole.numel()
    with torch.no_grad():
        logits = wrapped(input_ids=batch).logits
    record["forward bitwise equal"] = bool(torch.equal(logits, ref_logits))
    wrapped.train()
    wrapped(input_ids=mine, labels=mine).loss.backward()
    grads = trainable_grads(wrapped)
    record["grad names equal"] = sorted(grads) == sorted(ref_grads)
    record["grad max rel diff"] = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30))
                                     for n in ref_grads)
    after = frozen_inner(wrapped)
    record["frozen unchanged"] = all(torch.equal(after[k], v) for k, v in before.items())
    record["frozen no grad"] = all(p.grad is None for p in qft.nn.distributed.unwrap(wrapped).parameters()
                                   if not p.requires_grad)
    for p in wrapped.parameters():
        p.grad = None

    qft.save_quantized(wrapped, out / "ckpt")
    dist.barrier()
    loaded = qft.load_quantized(out / "ckpt")
    with torch.no_grad():
        record["loaded logits equal"] = bool(torch.equal(loaded(input_ids=batch).logits, ref_logits))

    losses = qft.train(wrapped, None, batch, **TRAIN).losses
    record["train losses"] = losses
    record["reference losses"] = ref_losses

    # the same run with gradient checkpointing: backward runs each layer's forward again
    checkpointed = wrap(prepared(), mode)
    calls = []
    qft.nn.distributed.unwrap(checkpointed).model.layers[0].mlp.register_forward_pre_hook(
        lambda module, args: calls.append(module.training))
    record["checkpointed losses"] = qft.train(checkpointed, None, batch, gradient_checkpointing=True, **TRAIN).losses
    record["checkpointed layer runs"] = sum(calls)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    del wrapped, checkpointed
    finish()


if __name__ == "__main__":
    main()
