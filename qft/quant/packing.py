"""Dense bit packing of 1-8-bit codes into 32-bit words.

Layout (the one the GPU kernels read): a code matrix of shape (rows, cols) is
packed row by row. Each row is a little-endian bit stream: code ``j`` occupies
bits ``[j*bits, (j+1)*bits)`` of the row, and bit ``i`` of the stream is bit
``i % 32`` of word ``i // 32``. A row is padded with zero bits up to a whole
word, so each output row's words are contiguous and a row starts on a word
boundary. Codes may straddle two words when ``bits`` does not divide 32.

Words are stored as ``torch.int32`` (safetensors has no uint32); read them as
unsigned by masking with ``0xFFFFFFFF`` after widening to int64.
"""

from __future__ import annotations

import sys

import torch

WORD_BITS = 32


def words_per_row(cols: int, bits: int) -> int:
    """Number of 32-bit words holding one packed row of ``cols`` codes."""
    return (cols * bits + WORD_BITS - 1) // WORD_BITS


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def _positions(cols: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(cols, device=device, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of shape (..., cols), each in [0, 2**bits), into int32 words.

    Returns shape (..., words_per_row(cols, bits)).
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    *lead, cols = codes.shape
    c = codes.reshape(-1, cols).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    n_words = words_per_row(cols, bits)
    word, shift = _positions(cols, bits, c.device)
    # Bits of different codes never overlap, so adding is the same as OR-ing.
    out = torch.zeros(c.shape[0], n_words + 1, dtype=torch.int64, device=c.device)
    out.index_add_(1, word, (c << shift) & 0xFFFFFFFF)
    out.index_add_(1, word + 1, c >> (WORD_BITS - shift))
    out = out[:, :n_words]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.reshape(*lead, n_words)


def stream_bytes(words: torch.Tensor) -> torch.Tensor:
    """The bit stream of int32 words (..., n_words) as bytes (..., 4 * n_words): byte ``i`` holds
    stream bits ``[8i, 8i + 8)``. A free view on little-endian hosts."""
    b = words.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        b = b.unflatten(-1, (-1, 4)).flip(-1).flatten(-2)
    return b


def unpack(words: torch.Tensor, bits: int, cols: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words (..., n_words) -> codes (..., cols) in ``dtype``
    (uint8; int32 when they index a table next).

    Works on bytes, never on one int64 per code: widths dividing 8 are shifted out of each byte;
    other widths read 8 codes at a time from the ``bits`` bytes that hold exactly them.
    """
    _check_bits(bits)
    *lead, n_words = words.shape
    if n_words != words_per_row(cols, bits):
        raise ValueError(
            f"{n_words} words per row cannot hold {cols} codes of {bits} bits "
            f"(expected {words_per_row(cols, bits)})"
        )
    b = stream_bytes(words.reshape(-1, n_words))
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
        codes = ((b.unsqueeze(-1) >> shifts) & mask).to(dtype)
    else:
        chunks = -(-cols // 8)  # 8 codes fill exactly `bits` bytes
        need = chunks * bits
        b = torch.cat([b, b.new_zeros(b.shape[0], max(0, need - b.shape[1]))], dim=1)[:, :need]
        wide = torch.int32 if bits * 8 < 32 else torch.int64
        parts = b.reshape(-1, chunks, bits).to(wide)
        chunk = parts[..., 0]
        for i in range(1, bits):
            chunk = chunk | (parts[..., i] << (8 * i))
        shifts = torch.arange(0, 8 * bits, bits, dtype=wide, device=b.device)
        codes = ((chunk.unsqueeze(-1) >> shifts) & mask).to(dtype)
    return codes.flatten(1)[:, :cols].reshape(*lead, cols)
