"""FSDP2 on one CUDA device with nccl (world size 1): the packed weights go through FSDP's all-gather
on the GPU, the forward equals the unsharded model's, and a training step moves only the adapters.

Skipped without a CUDA device or nccl. The 2-process checks run on CPU with gloo (tests/test_distributed.py).
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_llama

import qft
from qft.quant.tensor import QuantizedTensor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(),
                                                  reason="needs a CUDA device and nccl")]


@pytest.fixture
def one_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    yield
    dist.destroy_process_group()


def test_fsdp2_step_on_cuda(one_rank):
    model = qft.quantize_and_prepare(tiny_llama().cuda(), bits="nf3-b64", method="qlora", rank=4, progress=False)
    reference = copy.deepcopy(model)
    frozen = {n: p.dequantize() for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)}
    ids = torch.randint(0, 300, (2, 32), device="cuda")
    qft.shard(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    result = qft.train(model, None, ids, steps=2, batch_size=2, lr=1e-3, warmup=0, eval_blocks=0, progress=False)
    assert len(result.losses) == 2
    with qft.gathered(model) as whole:
        for n, p in whole.named_parameters():
            if isinstance(p, QuantizedTensor):
                assert p.device.type == "cuda" and torch.equal(p.dequantize(), frozen[n])
        moved = [float((p - dict(reference.named_parameters())[n]).abs().max())
                 for n, p in whole.named_parameters() if p.requires_grad]
    assert max(moved) > 0
