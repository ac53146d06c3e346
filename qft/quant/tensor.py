"""QuantizedTensor: a frozen quantized weight as one tensor.

A ``torch.Tensor`` subclass (a wrapper: it has the logical shape
(out_features, in_features) and a logical float dtype, but no dense storage)
that holds exactly what is written to disk: packed ``codes`` (int32, the
qft.quant.packing layout) and the format's stored scale tensors (``scale``, ``zero``,
``scale_codes``, ``scale_max``: see ``Format.stored_layout``). So ``nbytes``
is the true storage cost, and a layer can own it as its ``weight`` parameter
(non-trainable) the way torchao's NF4Tensor is owned.

- ``.to(device)`` moves the inner tensors; ``.to(dtype)`` / ``.half()`` only
  change the logical dtype (what ``dequantize()`` returns): packed bits are
  never cast or reinterpreted as floats.
- Decoded scales and the codebook are computed once and cached (not for a
  scale that trains: that one is decoded on every call so gradients flow).
- Any other torch operation sees the dense dequantized weight, so code that
  reads ``module.weight`` (transformers, PEFT) keeps working, slowly.
- ``to_tensors`` / ``from_tensors`` give a flat, self-describing dict for
  safetensors (shape and format name are tensors too).
- Under FSDP2 (``fully_shard``) a weight is cut into row shards, each holding
  1/N of the bytes of every inner tensor (flattened, zero-padded to a multiple
  of N); ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` gather the packed
  bytes and rebuild the whole weight, so packed bits are never cast. A shard
  only travels; it cannot be dequantized.
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map_only

from qft.quant.formats import Format, get_format
from qft.kernels.dispatch import dequantize as dequantize_codes
from qft.quant.packing import pack, words_per_row

aten = torch.ops.aten


def _encode_name(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def decode_name(t: torch.Tensor) -> str:
    """A format name stored as a tensor (``to_tensors()["format"]``) back as text."""
    return bytes(t.tolist()).decode("ascii")


class QuantizedTensor(torch.Tensor):
    format: Format
    codes: torch.Tensor  # int32 (rows, words_per_row(cols, bits)), qft.quant.packing layout

    @staticmethod
    def __new__(cls, format, shape, codes, tensors, dtype=torch.float32, shard_of=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(int(s) for s in shape), dtype=dtype, device=codes.device, requires_grad=False
        )

    def __init__(self, format: str | Format, shape, codes: torch.Tensor, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, shard_of: tuple | None = None) -> None:
        self.format = get_format(format)
        self.codes = codes
        self._names = tuple(tensors)
        for name, t in tensors.items():
            setattr(self, name, t)
        self._decoded = None
        self._codebook = None
        self._keep_decoded = True  # False for a weight FSDP gathers for one use: nothing may outlive the reshard
        # a row shard (FSDP2): (whole shape, number of shards, {inner name: whole shape}); its inner
        # tensors are flat byte-chunks of the whole weight's
        self.shard_of = shard_of

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def quantize(cls, w: torch.Tensor, format: str | Format, dtype: torch.dtype | None = None) -> QuantizedTensor:
        """Quantize a 2-D float weight (out_features, in_features); the logical dtype defaults to w's."""
        fmt = get_format(format)
        codes, tensors = fmt.quantize(w)
        return cls(fmt, tuple(w.shape), pack(codes, fmt.bits), tensors, dtype or w.dtype)

    @classmethod
    def empty(cls, format: str | Format, shape: tuple[int, int], device=None,
              dtype: torch.dtype = torch.float32, dtypes: dict[str, torch.dtype] | None = None) -> QuantizedTensor:
        """A zero-filled tensor of the right layout, to be filled by loading a checkpoint.

        dtypes: stored tensors whose dtype differs from the format's (a trained scale kept in fp32).
        """
        fmt = get_format(format)
        rows, cols = shape
        codes = torch.zeros(rows, words_per_row(cols, fmt.bits), dtype=torch.int32, device=device)
        tensors = {n: torch.zeros(s, dtype=(dtypes or {}).get(n, d), device=device)
                   for n, (s, d) in fmt.stored_layout(rows, cols).items()}
        return cls(fmt, (rows, cols), codes, tensors, dtype)

    def replace(self, **tensors: torch.Tensor) -> QuantizedTensor:
        """The same weight with some inner tensors exchanged (``codes=...``, ``scale=...``)."""
        codes = tensors.pop("codes", self.codes)
        return QuantizedTensor(self.format, self.shape, codes, {**self.tensors, **tensors}, self.dtype)

    # -- what it holds ----------------------------------------------------------------------------

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The format's stored scale tensors, by name."""
        return {n: getattr(self, n) for n in self._names}

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def block(self) -> int:
        return self.format.block_size(self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and stored scales (shape and format name not counted)."""
        return sum(t.numel() * t.element_size() for t in [self.codes, *self.tensors.values()])

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded float32 (scale, zero) per block; zero is None for symmetric formats. Cached,
        except while a stored scale requires grad (a trained scale must stay in the graph)."""
        return self._decode()[0]

    def offset(self) -> torch.Tensor | None:
        """Decoded float32 offset per block (llama.cpp's m in d·q + m), or None for formats without one;
        cached with the scales."""
        return self._decode()[1]

    def _decode(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor | None]:
        if self._decoded is not None:
            return self._decoded
        decoded = (self.format.decode_scales(self.tensors, self.rows, self.cols),
                   self.format.decode_offset(self.tensors, self.rows, self.cols))
        trained = any(isinstance(t, torch.nn.Parameter) or t.requires_grad for t in self.tensors.values())
        if self._keep_decoded and not trained:
            self._decoded = decoded
        return decoded

    def forget_decoded(self) -> None:
        """Drop the cached decoded scales: call it after changing a stored tensor in place."""
        self._decoded = None

    def codebook(self) -> torch.Tensor:
        if self._codebook is None:
            self._codebook = self.format.codebook(self.codes.device)
        return self._codebook

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, in ``dtype`` (default: this tensor's logical dtype)."""
        if self.shard_of is not None:
            raise RuntimeError(f"this is one of {self.shard_of[1]} FSDP shards of a {self.format.name} "
                               f"{tuple(self.shard_of[0])} weight, which holds only part of its packed bytes; "
                               "read the weight inside the sharded module's forward, or under qft.gathered(model)")
        scale, zero = self.scales()
        return dequantize_codes(
            self.codes, self.codebook(), scale, zero,
            bits=self.format.bits, cols=self.cols, block=self.block, dtype=dtype or self.dtype, offset=self.offset(),
        )

    # -- safetensors ------------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for safetensors; ``shape`` and ``format`` are tensors too."""
        return {
            "codes": self.codes,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "format": _encode_name(self.format.name),
            **self.tensors,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> QuantizedTensor:
        """Rebuild from :meth:`to_tensors`, checking that every piece is there and fits.

        A stored ``scale`` may come in any float dtype (a trained scale is kept in fp32)."""
        missing = {"codes", "shape", "format"} - tensors.keys()
        if missing:
            raise ValueError(f"not a qft QuantizedTensor: missing {sorted(missing)}")
        fmt = get_format(decode_name(tensors["format"]))
        rows, cols = (int(v) for v in tensors["shape"].tolist())
        rest = {k: v for k, v in tensors.items() if k not in ("codes", "shape", "format")}
        codes = tensors["codes"]
        expected = (rows, words_per_row(cols, fmt.bits))
        if tuple(codes.shape) != expected or codes.dtype != torch.int32:
            raise ValueError(
                f"codes of a {rows}x{cols} {fmt.name} tensor must be int32 {expected}, "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        layout = fmt.stored_layout(rows, cols)
        if rest.keys() != layout.keys():
            raise ValueError(f"a {rows}x{cols} {fmt.name} tensor stores {sorted(layout)}, got {sorted(rest)}")
        for name, (shape, want) in layout.items():
            t = rest[name]
            dtype_ok = t.dtype == want or (name == "scale" and t.dtype.is_floating_point)
            if tuple(t.shape) != shape or not dtype_ok:
                raise ValueError(
                    f"{name} of a {rows}x{cols} {fmt.name} tensor must be {want} {shape}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        return cls(fmt, (rows, cols), codes, rest, dtype)

    # -- torch integration ------------------------------------------------------------------------

    def __tensor_flatten__(self):
        return ["codes", *self._names], (self.format.name, tuple(self.shape), self.dtype, self.shard_of)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        name, shape, dtype, shard_of = meta
        codes = inner.pop("codes")
        return QuantizedTensor(name, shape, codes, inner, dtype, shard_of)

    def _map(self, fn, dtype: torch.dtype | None = None, shape=None) -> QuantizedTensor:
        """A new QuantizedTensor with ``fn`` applied to every inner tensor."""
        return QuantizedTensor(self.format, self.shape if shape is None else shape, fn(self.codes.detach()),
                               {n: fn(t.detach()) for n, t in self.tensors.items()}, dtype or self.dtype,
                               self.shard_of)

    # -- FSDP2 ------------------------------------------------------------------------------------

    def inner_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor it holds, by name: the packed codes and the format's stored tensors."""
        return {"codes": self.codes, **self.tensors}

    def shards(self, n: int) -> list[QuantizedTensor]:
        """``n`` row shards, each holding 1/n of every inner tensor's elements (flattened, zero-padded)."""
        if self.shard_of is not None:
            raise ValueError("this QuantizedTensor is already a shard")
        if self.rows % n:
            raise ValueError(f"a {tuple(self.shape)} QuantizedTensor cannot be split into {n} equal row shards "
                             f"({self.rows} rows); use a world size that divides every quantized matrix's rows")
        whole = {k: tuple(t.shape) for k, t in self.inner_tensors().items()}
        chunks = {}
        for k, t in self.inner_tensors().items():
            size = -(-t.numel() // n)
            flat = t.detach().reshape(-1)
            chunks[k] = torch.cat([flat, flat.new_zeros(size * n - flat.numel())]).split(size)
        return [QuantizedTensor(self.format, (self.rows // n, self.cols), chunks["codes"][i],
                                {k: chunks[k][i] for k in self._names}, self.dtype,
                                (tuple(self.shape), n, whole)) for i in range(n)]

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """FSDP2: what to all-gather (this shard's packed bytes, as they are) and how to rebuild."""
        return tuple(self.inner_tensors().values()), (self.format.name, self.dtype, self.shard_of, self._names)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """FSDP2: the whole weight from every rank's chunks (each gathered output is the chunks in rank
        order: the flattened inner tensor plus padding)."""
        name, dtype, (shape, _, whole), names = metadata
        full = {k: t.reshape(-1)[: math.prod(whole[k])].view(whole[k]) for k, t in zip(("codes", *names), outputs)}
        if out is not None:  # its inner tensors are views of the same storages, refilled in place
            return
        codes = full.pop("codes")
        whole_weight = QuantizedTensor(name, shape, codes, full, dtype)
        whole_weight._keep_decoded = False
        return whole_weight, ()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._map(lambda t: t)
        if func in _FSDP_OPS:
            return _FSDP_OPS[func](*args, **kwargs)
        if func is aten.clone.default:
            return args[0]._map(lambda t: t.clone())
        if func is aten._to_copy.default:
            # a dtype changes only the logical dtype; a device moves the packed tensors as they are
            device = kwargs.get("device")
            return args[0]._map(lambda t: t.to(device) if device is not None else t.clone(), kwargs.get("dtype"))
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if (not isinstance(src, QuantizedTensor) or src.format != dst.format or src.shape != dst.shape
                    or src.shard_of != dst.shard_of):
                raise ValueError(f"a {dst.format.name} {tuple(dst.shape)} QuantizedTensor can only be "
                                 f"overwritten by another of the same format and shape")
            dst.codes.copy_(src.codes)
            for n, t in dst.tensors.items():
                t.copy_(getattr(src, n))
            dst.forget_decoded()
            return dst
        # anything else computes on the dense weight
        args, kwargs = tree_map_only(QuantizedTensor, lambda q: q.dequantize(), (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"QuantizedTensor({self.format.name}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, {self.bits_per_param:.3f} bits/param, {self.nbytes} bytes)"
        )


# -- what FSDP2's fully_shard does to a parameter: chunk rows, pad, narrow, flatten ------------------

def _split(t: QuantizedTensor, split_size: int, dim: int = 0) -> list[QuantizedTensor]:
    if dim != 0:
        raise ValueError("a QuantizedTensor shards along its rows (dim 0) only")
    return t.shards(-(-t.rows // split_size))


def _new_zeros(t: QuantizedTensor, size, **kwargs) -> QuantizedTensor:
    size = tuple(size)
    if t.shard_of is None:  # FSDP asks the whole weight for a zero shard of its padded shard size
        if size[1:] != (t.cols,) or t.rows % size[0]:
            raise ValueError(f"cannot make a {size} shard of a {tuple(t.shape)} QuantizedTensor")
        t = t.shards(t.rows // size[0])[0]
    if size != tuple(t.shape):
        raise ValueError(f"cannot make a {size} shard like a {tuple(t.shape)} one")
    return t._map(torch.zeros_like)


def _slice(t: QuantizedTensor, dim: int = 0, start=None, end=None, step: int = 1) -> QuantizedTensor:
    if dim == 0 and (start or 0) == 0 and (end is None or end >= t.shape[0]) and step == 1:
        return t._map(lambda x: x)
    raise ValueError(f"a QuantizedTensor can only be sliced whole, not [{start}:{end}:{step}] on dim {dim}")


def _view(t: QuantizedTensor, size) -> QuantizedTensor:
    size = tuple(size)
    numel = t.numel()
    flat = size in ((-1,), (numel,))
    if size == tuple(t.shape) or (flat and t.shard_of is not None):
        return t._map(lambda x: x, shape=(numel,) if flat else None)
    raise ValueError(f"a QuantizedTensor cannot be viewed as {size}")


def _as_strided(t: QuantizedTensor, size, stride, storage_offset=0) -> QuantizedTensor:
    if tuple(size) != tuple(t.shape) or storage_offset:
        raise ValueError(f"a {tuple(t.shape)} QuantizedTensor cannot be viewed as {tuple(size)}")
    return t._map(lambda x: x)


_FSDP_OPS = {
    aten.split.Tensor: _split,
    aten.new_zeros.default: _new_zeros,
    aten.slice.Tensor: _slice,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
}
