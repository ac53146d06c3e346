import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qft.quant.packing import pack, unpack, words_per_row


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 9),
    cols=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_roundtrip(bits, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int64).to(torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, words_per_row(cols, bits))
    assert torch.equal(unpack(words, bits, cols), codes)


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), lead=st.lists(st.integers(1, 4), max_size=2), cols=st.integers(1, 70))
def test_pack_any_leading_shape(bits, lead, cols):
    codes = torch.randint(0, 1 << bits, (*lead, cols)).to(torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, cols), codes)


def test_layout_is_little_endian_bit_stream():
    # 3-bit codes: code j sits at bits [3j, 3j+3) of the row; code 10 straddles words 0 and 1.
    codes = (torch.arange(1, 12) % 8).to(torch.uint8).reshape(1, -1)
    words = pack(codes, 3)
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    expect = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(2)]
    assert [int(w) & 0xFFFFFFFF for w in words[0]] == expect


def test_rows_start_on_word_boundaries():
    codes = torch.full((3, 5), 3, dtype=torch.uint8)  # 10 bits per row -> 1 word each
    words = pack(codes, 2)
    assert words.shape == (3, 1)
    assert torch.equal(words[:, 0], torch.full((3,), 0x3FF, dtype=torch.int32))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 8)
