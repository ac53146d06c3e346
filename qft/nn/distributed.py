"""Training a prepared model on several processes: FSDP2 shards it, DDP replicates it.

Launch with ``torchrun`` or ``accelerate launch`` (one process per GPU; gloo on CPU), call
``torch.distributed.init_process_group``, prepare the model on every rank with the same seed, then:

- :func:`shard` applies FSDP2's ``fully_shard`` to every decoder layer and to the root. Each
  frozen :class:`~qft.QuantizedTensor` is cut into row shards holding 1/world of its packed
  bytes (``QuantizedTensor.shards``); before a layer runs, FSDP all-gathers those bytes as they
  are and rebuilds the weight (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``), so packed
  bits are never cast to floats. The trainable adapters are ordinary FSDP parameters.
- :func:`replicate` wraps the model in ``DistributedDataParallel`` with everything frozen
  (quantized weights, biases, 8-bit HALO bases) broadcast once from rank 0 and kept out of DDP's
  synchronisation: DDP all-reduces the gradients of what trains and nothing else.

``qft.train`` gives each rank its slice of every batch; ``qft.save_quantized`` of a sharded or
replicated model gathers it and writes one ordinary checkpoint from rank 0.

To end: drop the DDP wrapper (``del model; gc.collect()``) before ``destroy_process_group()``. A DDP
reducer left holding the last reference to a gloo process group destroys it at exit while holding the
GIL, and can wait forever on a gloo thread that needs the GIL to free a finished collective's tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from qft.nn import QLinear, qft_layers
from qft.quant.tensor import QuantizedTensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decoder_layers(model: nn.Module, names=None) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks and its path: the nn.ModuleList holding the most of ``names``
    (module or parameter names; default every parameter's), the outermost on a tie. Not simply the
    longest list: in a mixture-of-experts model a layer's list of experts can be longer."""
    names = [n for n, _ in model.named_parameters()] if names is None else list(names)
    best = ("", None, 0)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            held = sum(n.startswith(path + ".") for n in names)
            if held > best[2]:
                best = (path, module, held)
    if best[1] is None:
        raise ValueError(f"found no nn.ModuleList of decoder layers in {type(model).__name__}")
    return best[0], best[1]


def _check_shardable(model: nn.Module) -> None:
    for name, module in qft_layers(model, (QLinear,)).items():
        if module.scale is not None:
            raise ValueError(f"{name} trains the scales stored inside its quantized weight (PEQA), which FSDP2 "
                             "cannot shard apart from the weight; train PEQA with qft.replicate (DDP)")


def shard(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 (``fully_shard``) on every decoder layer, then on the root; returns ``model``.

    mesh: a 1-D DeviceMesh (default: every rank of the default process group). Every quantized
    matrix's row count must divide by the world size."""
    from torch.distributed.fsdp import fully_shard

    _check_shardable(model)
    _, size = world()
    for name, p in model.named_parameters():
        if isinstance(p, QuantizedTensor) and p.shape[0] % size:
            raise ValueError(f"{name} has {p.shape[0]} rows, which {size} processes cannot share evenly; "
                             "use a world size that divides every quantized matrix's rows")
    for layer in decoder_layers(model)[1]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen parameter and every buffer, by name (a quantized weight counts once, whole)."""
    state = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    state.update(dict(model.named_buffers()))
    return state


def _broadcast(t: torch.Tensor) -> None:
    pieces = t.inner_tensors().values() if isinstance(t, QuantizedTensor) else [t]
    for piece in pieces:
        data = piece.data
        if data.dtype.itemsize == 1 and data.is_floating_point():  # FP8: not every backend sends it
            data = data.view(torch.uint8)
        dist.broadcast(data, src=0)
    if isinstance(t, QuantizedTensor):
        t.forget_decoded()


def exclude_frozen(model: nn.Module) -> nn.Module:
    """Broadcast the frozen state (quantized weights, biases, HALO's 8-bit bases, norms, embeddings)
    once from rank 0 and mark it for any later ``DistributedDataParallel`` wrapper to leave alone:
    DDP then broadcasts and all-reduces only what trains. Call it before a trainer that wraps the
    model in DDP itself (``transformers.Trainer`` under torchrun); one process: nothing to do."""
    if world()[1] == 1:
        return model
    frozen = _frozen_state(model)
    with torch.no_grad():
        for t in frozen.values():
            _broadcast(t)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(frozen))
    return model


def replicate(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` over what trains (:func:`exclude_frozen` first)."""
    return nn.parallel.DistributedDataParallel(exclude_frozen(model), **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 keeps the model itself)."""
    return model.module if is_replicated(model) else model


def model_class(model: nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps in an ``FSDP<class>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_replicated(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; of a sharded model under :func:`gathered`, its whole tensors (FSDP2's
    state-dict hook would shard them back first, so each module is asked for its own part)."""
    if not is_sharded(model):
        return model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module._save_to_state_dict(state, f"{name}." if name else "", False)
    return state


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every FSDP2 unit of ``model`` holds its whole parameters (each rank a full copy);
    resharded on exit. A model that is not sharded passes through."""
    from torch.distributed.fsdp import FSDPModule

    model = unwrap(model)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a number over every rank (the number itself in one process); ``device``: where the
    backend communicates (nccl: the rank's GPU)."""
    _, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / size
