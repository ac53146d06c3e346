"""QuantizedTensor: a frozen quantized weight as one tensor.

A ``torch.Tensor`` subclass (a wrapper: it has the logical shape
(out_features, in_features) and a logical float dtype, but no dense storage)
that holds exactly what is written to disk: packed ``codes`` (int32, the
qft.packing layout) and the format's stored scale tensors (``scale``, ``zero``,
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
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from qft.formats import Format, get_format
from qft.kernels import dequantize as dequantize_codes
from qft.packing import pack, words_per_row

aten = torch.ops.aten


def _encode_name(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def _decode_name(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("ascii")


class QuantizedTensor(torch.Tensor):
    format: Format
    codes: torch.Tensor  # int32 (rows, words_per_row(cols, bits)), qft.packing layout

    @staticmethod
    def __new__(cls, format, shape, codes, tensors, dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(int(s) for s in shape), dtype=dtype, device=codes.device, requires_grad=False
        )

    def __init__(self, format: str | Format, shape, codes: torch.Tensor, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> None:
        self.format = get_format(format)
        self.codes = codes
        self._names = tuple(tensors)
        for name, t in tensors.items():
            setattr(self, name, t)
        self._decoded = None
        self._codebook = None

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
        if self._decoded is not None:
            return self._decoded
        decoded = self.format.decode_scales(self.tensors, self.rows, self.cols)
        if not any(isinstance(t, torch.nn.Parameter) or t.requires_grad for t in self.tensors.values()):
            self._decoded = decoded
        return decoded

    def codebook(self) -> torch.Tensor:
        if self._codebook is None:
            self._codebook = self.format.codebook(self.codes.device)
        return self._codebook

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, in ``dtype`` (default: this tensor's logical dtype)."""
        scale, zero = self.scales()
        return dequantize_codes(
            self.codes, self.codebook(), scale, zero,
            bits=self.format.bits, cols=self.cols, block=self.block, dtype=dtype or self.dtype,
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
        fmt = get_format(_decode_name(tensors["format"]))
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
        return ["codes", *self._names], (self.format.name, tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        name, shape, dtype = meta
        codes = inner.pop("codes")
        return QuantizedTensor(name, shape, codes, inner, dtype)

    def _map(self, fn, dtype: torch.dtype | None = None) -> QuantizedTensor:
        """A new QuantizedTensor with ``fn`` applied to every inner tensor."""
        return QuantizedTensor(self.format, self.shape, fn(self.codes.detach()),
                               {n: fn(t.detach()) for n, t in self.tensors.items()}, dtype or self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._map(lambda t: t)
        if func is aten.clone.default:
            return args[0]._map(lambda t: t.clone())
        if func is aten._to_copy.default:
            # a dtype changes only the logical dtype; a device moves the packed tensors as they are
            device = kwargs.get("device")
            return args[0]._map(lambda t: t.to(device) if device is not None else t.clone(), kwargs.get("dtype"))
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if not isinstance(src, QuantizedTensor) or src.format != dst.format or src.shape != dst.shape:
                raise ValueError(f"a {dst.format.name} {tuple(dst.shape)} QuantizedTensor can only be "
                                 f"overwritten by another of the same format and shape")
            dst.codes.copy_(src.codes)
            for n, t in dst.tensors.items():
                t.copy_(getattr(src, n))
            dst._decoded = None
            return dst
        # anything else computes on the dense weight
        args, kwargs = tree_map_only(QuantizedTensor, lambda q: q.dequantize(), (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"QuantizedTensor({self.format.name}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, {self.bits_per_param:.3f} bits/param, {self.nbytes} bytes)"
        )
