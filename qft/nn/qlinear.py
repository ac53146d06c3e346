"""QLinear: a frozen quantized weight plus the small high-precision adapters that train.

    y = x @ dequant(W).T + bias + scaling * (x @ A.T) @ B.T

``weight`` is a :class:`~qft.quant.tensor.QuantizedTensor` held as a non-trainable
``nn.Parameter`` (so ``module.weight.dtype``/``.shape``/``.device`` answer as
for nn.Linear, and FSDP2 can treat it as a parameter). The adapters are the
layer's trainable parts, each in its own dtype (fp32 by default):

- ``lora_A`` (rank, in) and ``lora_B`` (out, rank), with ``scaling`` = alpha / rank
  (a Python float: a cast of the model never rounds it);
- with ``pool=g`` (QA-LoRA), ``lora_A`` is (rank, ceil(in / g)) and reads x averaged over each group
  of g columns (the last group may be short: its own length divides), so the update
  scaling·B·A / len(group) is constant within each (row, group): a format with a per-block
  offset of the same blocks absorbs it exactly (``qft.methods.qalora.merge_qalora``);
- ``scale`` (with ``train_scales=True``): the weight's own stored scales, made
  trainable. It is the same tensor the weight holds, so ``weight.dequantize()``,
  the report, checkpoints and exports all see the trained values.

The state dict stays flat and self-describing: ``weight_codes``,
``weight_shape``, ``weight_format``, ``weight_<stored scale>``,
``lora_A``, ``lora_B``, ``lora_scaling`` (float64), ``lora_pool`` (int64, pooled layers only),
``bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from qft.kernels.dispatch import dequant_matmul
from qft.quant.tensor import QuantizedTensor, decode_name

_PREFIX = "weight_"
ADAPTERS = ("lora_A", "lora_B", "scale")  # what trains, and nothing else
_RECORDED = (_PREFIX + "shape", _PREFIX + "format", "lora_scaling", "lora_pool", "train_scales")  # layout, not data


class QLinear(nn.Module):
    def __init__(
        self,
        weight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        rank: int = 0,
        alpha: float | None = None,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
        train_scales: bool = False,
        generator: torch.Generator | None = None,
        seed: int = 0,
        adapter_dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        pool: int = 0,
    ) -> None:
        """generator: the stream PEFT-style LoRA-A initialisation draws from (share one across layers,
        as PEFT does); without one, a fresh stream seeded with ``seed``. pool: average the LoRA's input
        over groups of this many columns (QA-LoRA; 0: plain LoRA); without a LoRA (rank 0) there is
        nothing to pool and it is 0."""
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise ValueError(f"weight must be a qft.QuantizedTensor, got {type(weight).__name__}; "
                             "use QLinear.from_linear to quantize an nn.Linear")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if pool < 0:
            raise ValueError(f"pool must be >= 0 (0: no pooling), got {pool}")
        self.scale = self.lora_A = self.lora_B = None
        self.dense_cache: torch.Tensor | None = None  # dequant(W), set by qft.dense_weights for inference
        self.scaling = 0.0
        self.out_features, self.in_features = weight.shape
        self.rank = int(rank)
        self.pool = int(pool) if rank else 0  # set before any tensor attribute: _flat_tensors reads it
        self.backend = backend
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

        if train_scales:
            stored = weight.tensors.get("scale")
            if stored is None or not stored.is_floating_point():
                raise ValueError(
                    f"train_scales needs scales stored as floats; {weight.format.name} stores them as "
                    f"{sorted(weight.tensors)} (double-quantized codes). Use an int-k, plain NF-k or FP8 format"
                )
            self.scale = nn.Parameter(stored.detach().to(adapter_dtype).clone())
            self.weight.scale = self.scale

        if rank:
            a, b = self._init_factors(lora_a, lora_b, generator, seed, adapter_dtype)
            self.lora_A = nn.Parameter(a.to(weight.device))
            self.lora_B = nn.Parameter(b.to(weight.device))
            self.scaling = float(alpha if alpha is not None else rank) / rank
        elif lora_a is not None or lora_b is not None:
            raise ValueError("low-rank factors were given but rank=0; pass rank=A.shape[0]")

    def _init_factors(self, a, b, generator, seed, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        want_a, want_b = (self.rank, self.lora_in_features), (self.out_features, self.rank)
        if a is None:
            a = peft_lora_a(self.rank, self.lora_in_features, generator, seed)
        if b is None:
            b = torch.zeros(want_b)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"low-rank factors must be A {want_a} and B {want_b}, "
                f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        # contiguous: a checkpoint stores them so, and a matmul on another layout may round differently
        return (a.detach().to(dtype).clone(memory_format=torch.contiguous_format),
                b.detach().to(dtype).clone(memory_format=torch.contiguous_format))

    def _link_scale(self) -> None:
        """Make the weight hold the trainable scale itself: one set of scales, never two."""
        if self.scale is not None and self.weight.scale is not self.scale:
            self.weight.scale = self.scale
            self.weight.forget_decoded()

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Module, format, **kwargs) -> QLinear:
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``, whose weight is stored transposed);
        the bias is kept, frozen."""
        qweight = QuantizedTensor.quantize(dense_weight(linear), format)
        return cls(qweight, linear.bias, **kwargs)

    @classmethod
    def empty(cls, spec: dict, device=None) -> QLinear:
        """A layer with the layout ``spec`` (:meth:`spec`) describes and zeros everywhere: a checkpoint fills it."""
        out_features, in_features = spec["shape"]
        dtypes = {k: getattr(torch, v) for k, v in spec["dtypes"].items()}
        stored = {k[len(_PREFIX):]: d for k, d in dtypes.items() if k.startswith(_PREFIX)}
        weight = QuantizedTensor.empty(spec["format"], (out_features, in_features), device,
                                       getattr(torch, spec["dtype"]), stored)
        rank, pool = spec["rank"], spec.get("pool", 0)  # specs written before pooling have no "pool"
        n_in = -(-in_features // pool) if pool and rank else in_features
        bias = None if spec["bias"] is None else torch.zeros(out_features, dtype=getattr(torch, spec["bias"]),
                                                             device=device)
        layer = cls(weight, bias, rank=rank, alpha=spec["alpha"],
                    lora_a=torch.zeros(rank, n_in, device=device) if rank else None,
                    lora_b=torch.zeros(out_features, rank, device=device) if rank else None,
                    train_scales=spec["train_scales"], adapter_dtype=dtypes.get("lora_A", torch.float32), pool=pool)
        if rank:
            layer.lora_B.data = layer.lora_B.data.to(dtypes["lora_B"])
        if layer.scale is not None:
            layer.scale.data = layer.scale.data.to(dtypes[_PREFIX + "scale"])
            layer._link_scale()
        return layer

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "", **kwargs) -> QLinear:
        """Rebuild a QLinear from its state_dict alone (format, shape and scaling are stored in it)."""
        qt = QuantizedTensor.from_tensors(
            {k[len(prefix + _PREFIX):]: v for k, v in state.items() if k.startswith(prefix + _PREFIX)}
        )
        lora_a = state.get(prefix + "lora_A")
        rank = 0 if lora_a is None else lora_a.shape[0]
        kwargs.setdefault("pool", int(state.get(prefix + "lora_pool", torch.tensor(0))))
        return cls(
            qt, state.get(prefix + "bias"), rank=rank,
            alpha=float(state[prefix + "lora_scaling"]) * rank if rank else None,
            lora_a=lora_a, lora_b=state.get(prefix + "lora_B"),
            train_scales=bool(state.get(prefix + "train_scales", torch.tensor(0))),
            adapter_dtype=lora_a.dtype if lora_a is not None else torch.float32, **kwargs,
        )

    def spec(self) -> dict:
        """What it takes to rebuild this layer empty (checkpoints record it): layout and every dtype."""
        spec = {
            "format": self.weight.format.name,
            "shape": [self.out_features, self.in_features],
            "dtype": str(self.weight.dtype).removeprefix("torch."),
            "rank": self.rank,
            "alpha": self.scaling * self.rank if self.rank else None,
            "bias": None if self.bias is None else str(self.bias.dtype).removeprefix("torch."),
            "train_scales": self.scale is not None,
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in self._flat_tensors().items()},
        }
        if self.pool:  # only where pooled: an unpooled layer's spec reads as before
            spec["pool"] = self.pool
        return spec

    # -- the flat state dict ----------------------------------------------------------------------

    def _flat_tensors(self) -> dict[str, torch.Tensor]:
        flat = {_PREFIX + n: t for n, t in self.weight.to_tensors().items()}
        flat |= {n: getattr(self, n) for n in ("lora_A", "lora_B", "bias") if getattr(self, n) is not None}
        if self.rank:
            flat["lora_scaling"] = torch.tensor(self.scaling, dtype=torch.float64)
        if self.pool:
            flat["lora_pool"] = torch.tensor(self.pool, dtype=torch.int64)
        if self.scale is not None:
            flat["train_scales"] = torch.tensor(1, dtype=torch.uint8)
        return flat

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + n: t if keep_vars else t.detach() for n, t in self._flat_tensors().items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        expected = set(self._flat_tensors())
        missing_keys.extend(prefix + k for k in sorted(expected - set(ours)))
        if strict:
            unexpected_keys.extend(prefix + k for k in sorted(set(ours) - expected))
        if "lora_pool" in ours and "lora_pool" not in expected:  # a QA-LoRA state: its A means something else
            error_msgs.append(f"{prefix[:-1]}: the state holds a LoRA pooled over groups of {int(ours['lora_pool'])} "
                              "columns, this layer is not pooled; build the layer with QLinear.from_state_dict")
        try:  # what is there loads, what is not is reported (strict=False loads an adapter alone); the
            # layout (format, shape, pooling) is checked before any data is copied
            for name in sorted(expected & set(ours), key=lambda n: (n not in _RECORDED, n)):
                self._assign_flat(name, ours[name], copy=not local_metadata.get("assign_to_params_buffers", False))
        except ValueError as e:
            error_msgs.append(f"{prefix[:-1]}: {e}")

    # transformers' loader reads and sets each checkpoint tensor as an attribute of its module (FSDP2 swaps
    # sharded DTensor parameters and their gathered wholes: those go through as they are)
    def __getattr__(self, name: str):
        if name.startswith(_PREFIX) or name in _RECORDED:
            flat = self._flat_tensors()
            if name in flat:
                return flat[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if (isinstance(self.__dict__.get("_parameters", {}).get("weight"), QuantizedTensor)
                and isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
                and not isinstance(self._parameters.get(name), DTensor) and name in self._flat_tensors()):
            self._assign_flat(name, value, copy=False)
        else:
            super().__setattr__(name, value)

    def _assign_flat(self, name: str, value: torch.Tensor, copy: bool) -> None:
        """Put one flat state-dict tensor where it belongs (``copy``: into the existing storage)."""
        value, current = value.detach(), self._flat_tensors()[name]
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, this layer needs {tuple(current.shape)}")
        trainable = {"lora_A": "lora_A", "lora_B": "lora_B", _PREFIX + "scale": "scale" if self.scale is not None else None}
        if name in _RECORDED:  # layout and scaling: checked (the layout is the layer's own), not stored
            self._check_recorded(name, value)
        elif copy and not current.is_meta:
            with torch.no_grad():
                current.copy_(value)
        elif name == "bias":
            self._buffers["bias"] = value.to(current.dtype)
        elif trainable.get(name):
            param = self._parameters[trainable[name]]
            self._parameters[trainable[name]] = nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
        elif value.dtype != current.dtype:
            raise ValueError(f"{name} is {value.dtype}, this layer stores {current.dtype}")
        else:
            self._parameters["weight"] = nn.Parameter(self.weight.replace(**{name[len(_PREFIX):]: value}),
                                                      requires_grad=False)
        self.weight.forget_decoded()
        self._link_scale()

    def _check_recorded(self, name: str, value: torch.Tensor) -> None:
        if name == _PREFIX + "format" and decode_name(value) != self.weight.format.name:
            raise ValueError(f"the state holds a {decode_name(value)} weight, this layer is "
                             f"{self.weight.format.name}; build the layer with QLinear.from_state_dict instead")
        if name == _PREFIX + "shape" and value.tolist() != list(self.weight.shape):
            raise ValueError(f"the state holds a {value.tolist()} weight, this layer is {list(self.weight.shape)}")
        if name == "lora_scaling":
            self.scaling = float(value)
        if name == "lora_pool" and int(value) != self.pool:
            raise ValueError(f"the state holds a LoRA pooled over groups of {int(value)} columns, this layer pools "
                             f"over {self.pool}; build the layer with QLinear.from_state_dict instead")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._link_scale()  # the weight's copy of the trainable scale must be the moved/cast parameter
        return self

    # -- compute ----------------------------------------------------------------------------------

    @property
    def format(self):
        return self.weight.format

    def adapters(self) -> dict[str, nn.Parameter]:
        """The parameters that train (low-rank factors, trainable scales), by name."""
        return {n: getattr(self, n) for n in ADAPTERS if getattr(self, n) is not None}

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(Q): the frozen weight without the low-rank part."""
        return self.weight.dequantize(dtype)

    @property
    def lora_in_features(self) -> int:
        """Columns of ``lora_A``: in_features, or the number of pooling groups ceil(in / pool)."""
        return -(-self.in_features // self.pool) if self.pool else self.in_features

    def _group_lengths(self, device=None) -> torch.Tensor:
        """float32 (n_groups,): how many columns each pooling group holds (the last may be short)."""
        lengths = torch.full((self.lora_in_features,), float(self.pool), device=device)
        lengths[-1] = self.in_features - self.pool * (self.lora_in_features - 1)
        return lengths

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) averaged over each pooling group, in lora_A's dtype: what a pooled lora_A reads."""
        x = x.to(self.lora_A.dtype)
        pad = -self.in_features % self.pool
        if not pad:
            return x.unflatten(-1, (-1, self.pool)).mean(-1)
        sums = F.pad(x, (0, pad)).unflatten(-1, (-1, self.pool)).sum(-1)
        return sums / self._group_lengths(x.device).to(x.dtype)

    def unpooled_lora_A(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (rank, in_features) A of a plain LoRA with the same update: a pooled A's column for each
        group, divided by the group's length, repeated over its columns (what PEFT or llama.cpp can hold)."""
        with torch.no_grad():
            a = self.lora_A.float()
            if self.pool:
                a = (a / self._group_lengths(a.device)).repeat_interleave(self.pool, dim=1)[:, :self.in_features]
        return a.to(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(W) + scaling · B·A as one dense matrix (trained scales included; a pooled A unpooled)."""
        with torch.no_grad():
            w = self.weight.dequantize(torch.float32)
            if self.rank:
                w = w + self.scaling * (self.lora_B.float() @ self.unpooled_lora_A())
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        self._link_scale()  # cheap identity check; a deepcopy or a loader may have replaced the parameter
        w = self.weight
        if self.dense_cache is not None and not torch.is_grad_enabled():
            y = x @ self.dense_cache.to(x.dtype).t()  # what the torch path computes, minus the dequant
        else:
            scale, zero = w.scales()
            y = dequant_matmul(
                x, w.codes, w.codebook(), scale, zero,
                bits=w.format.bits, cols=self.in_features, block=w.block, backend=self.backend, offset=w.offset(),
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.rank:
            h = F.linear(self.pool_input(x) if self.pool else x.to(self.lora_A.dtype), self.lora_A)
            if h.dtype == y.dtype == self.lora_B.dtype:
                # y + scaling·(h Bᵀ) in one addmm: no separate passes over the output to scale and add
                flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), self.lora_B.t(),
                                   alpha=self.scaling)
                return flat.view(y.shape)
            y = y + (self.scaling * F.linear(h, self.lora_B)).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", self.weight.format.name]
        if self.rank:
            parts.append(f"rank={self.rank}, scaling={self.scaling:g}" + (f", pool={self.pool}" if self.pool else ""))
        if self.scale is not None:
            parts.append("train_scales=True")
        return ", ".join(parts)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): y = x @ W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def oriented(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) ``weight`` as ``module`` holds it, and back: transposed for a Conv1D (GPT-2), which
    stores (in, out)."""
    return weight.t() if is_conv1d(module) else weight


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of an nn.Linear or a transformers Conv1D."""
    return oriented(module, module.weight.detach())


def peft_lora_a(rank: int, in_features: int, generator: torch.Generator | None = None,
                seed: int = 0) -> torch.Tensor:
    """LoRA's A (rank, in_features) as PEFT initialises it: Kaiming-uniform, U(-1/√in, 1/√in), in float32
    (B starts at zero, so the adapter starts as a no-op). Drawn from ``generator``, or without one from
    a fresh stream seeded with ``seed``."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
