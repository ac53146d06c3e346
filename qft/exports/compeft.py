"""ComPEFT (Yadav et al., 2023): an adapter update as signs on a few positions and one scale.

The update τ of a trained adapter (its trained values minus the values it started from) keeps
its ``density`` largest entries by magnitude, each replaced by its sign, all scaled by
α·σ(τ), σ the standard deviation of the update before sparsification. By default each of an
adapter's tensors keeps its own top ``density`` and its own σ (``scope="tensor"``); the
paper's code takes one global top-k and one scalar σ over all of them (``scope="global"``).
Per tensor is the default because it kept task accuracy on both task adapters it was measured on
(RESULTS.md: SST-2 and ARC-Easy at 5 % density, 44.5× smaller, within a point; global lost 8.5
and 4.2 points there), and a global top-k can leave a tensor whose update is small (PEFT LoRA's B)
with nothing.

What each method's update is relative to: PEFT LoRA's A and B themselves (the paper's choice:
θ_init = 0); a qft adapter's trained values minus its initial ones, which live in the base
checkpoint the adapter was trained from (LQ-LoRA's factors start from an SVD of the weight,
PEQA's scales from round-to-nearest: both belong to the base).

The file (``.qftc``) really is small. Per tensor, the kept positions are coded as the gaps
between them with a Golomb–Rice code (unary quotients in one stream, fixed-width remainders
in another, so both decode without a loop; at parameter 0 the code is a bitmask, which is what
dense updates get); signs take one bit each; the scale is in the header. Layout::

    b"QFTC" | u8 version | u32 header length | zlib(JSON header) | payload | SHA-256 of all before it

The header is deflated because it is not small: one entry per tensor (an LQ-LoRA adapter of
SmolLM2 has 420), 135 KB as plain JSON, as much as the payload of a 1 %-density update.

A file that is truncated, altered, of another kind, or made for another base is refused with a
:class:`qft.files.checkpoint.CheckpointError` (or ValueError for the base) before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qft.files.atomic import atomic_write_bytes
from qft.files.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

MAGIC = b"QFTC"
FORMAT_VERSION = 1
SCOPES = ("global", "tensor")
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_DIGEST = 32


@dataclass
class Ternary:
    """A compressed tensor: ``scale`` · sign at the sorted flat ``positions``, zero elsewhere."""

    shape: tuple[int, ...]
    positions: torch.Tensor  # int64, sorted, flat indices
    negative: torch.Tensor  # bool, one per position
    scale: float
    dtype: torch.dtype = torch.float32

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(math.prod(self.shape), dtype=torch.float32)
        out[self.positions] = torch.where(self.negative, -self.scale, self.scale)
        return out.reshape(self.shape).to(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density is the fraction of entries kept, in (0, 1]; got {density}")


def _keep(magnitude: torch.Tensor, density: float) -> torch.Tensor:
    """Flat indices of the ``density`` largest magnitudes (ties broken by position: reproducible)."""
    k = max(1, round(density * magnitude.numel()))
    order = torch.sort(magnitude, descending=True, stable=True).indices
    return order[:k]


def compress(update: torch.Tensor | dict[str, torch.Tensor], density: float, alpha: float = 1.0,
             *, scope: str = "tensor") -> Ternary | dict[str, Ternary]:
    """Keep the top ``density`` of ``update`` by magnitude as signs scaled by ``alpha``·σ(update).

    A dict is one update made of several tensors: with ``scope="tensor"`` the top-k and σ run over
    each alone, with ``"global"`` (the paper's) over all of them together.
    """
    _check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(update, torch.Tensor):  # one tensor: both scopes are the same
        return compress({"": update}, density, alpha, scope="global")[""]
    if not update:
        raise ValueError("the update has no tensors")
    flat = {name: t.detach().float().reshape(-1).cpu() for name, t in update.items()}
    for name, t in flat.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"the update of {name or 'the tensor'} holds NaN or inf; check the adapter")
    if scope == "tensor":
        return {name: compress(update[name], density, alpha) for name in update}
    whole = torch.cat(list(flat.values()))
    scale = alpha * float(whole.std()) if whole.numel() > 1 else alpha * float(whole.abs().max())
    kept = torch.zeros(whole.numel(), dtype=torch.bool)
    kept[_keep(whole.abs(), density)] = True
    out, start = {}, 0
    for name, t in flat.items():
        mask = kept[start:start + t.numel()]
        positions = torch.nonzero(mask).reshape(-1)
        out[name] = Ternary(tuple(update[name].shape), positions, t[positions] < 0, scale, update[name].dtype)
        start += t.numel()
    empty = [name for name, t in out.items() if t.positions.numel() == 0 and bool(flat[name].any())]
    if empty:
        logger.warning("global top-%g keeps nothing of %d of %d tensors (e.g. %s): their updates are much smaller "
                       "than the others' (PEFT LoRA's B after short training); scope='tensor' keeps each tensor's "
                       "own top entries and scale", density, len(empty), len(out), empty[0])
    return out


def decompress(ternary: Ternary | dict[str, Ternary]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The dense update(s) a :func:`compress` result stands for."""
    if isinstance(ternary, Ternary):
        return ternary.to_dense()
    return {name: t.to_dense() for name, t in ternary.items()}


def least_squares_alpha(update: dict[str, torch.Tensor], ternary: dict[str, Ternary]) -> float:
    """The α minimising ‖τ − α·σ·s‖² over the kept signs s (the starting point of an α search)."""
    num = den = 0.0
    for name, t in ternary.items():
        kept = update[name].detach().float().reshape(-1).cpu()[t.positions]
        num += float(kept.abs().sum())
        den += t.positions.numel() * t.scale
    return num / den if den else 1.0


# ---- bit coding -------------------------------------------------------------------------------


def _bits_to_bytes(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _bytes_to_bits(data: bytes, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits.size < count:
        raise CheckpointError("a compressed tensor's bit stream is shorter than its header says")
    return bits[:count].astype(bool)


def rice_cost(gaps: np.ndarray, k: int) -> int:
    """Bits of the Rice code with parameter ``k``: per gap a unary quotient, its stop bit, k bits."""
    return int((gaps >> k).sum()) + gaps.size * (k + 1)


def encode_positions(positions: torch.Tensor, numel: int) -> tuple[bytes, dict]:
    """The Rice code of the gaps between sorted positions, with the cheapest parameter k. At k = 0 it
    is a bitmask up to the last kept entry (a 0 per kept entry, a 1 per skipped one), so a dense
    update never costs more than a bitmask. When more than half of the entries are kept, the
    positions *not* kept are coded instead (``complement``): a nearly full tensor costs little."""
    kept = positions.numpy().astype(np.int64)
    complement = 2 * kept.size > numel
    if complement:
        mask = np.ones(numel, dtype=bool)
        mask[kept] = False
        kept = np.flatnonzero(mask)
    gaps = np.diff(kept, prepend=-1) - 1
    around = int(math.log2(gaps.mean() + 1)) if gaps.size else 0  # the best k is near log2 of the mean gap
    k = min(range(max(0, around - 2), around + 3), key=lambda k: rice_cost(gaps, k))
    q, r = gaps >> k, gaps & ((1 << k) - 1)
    unary = np.ones(int(q.sum()) + gaps.size, dtype=bool)
    unary[np.cumsum(q + 1) - 1] = False  # each quotient's stop bit
    rem = ((r[:, None] >> np.arange(k)) & 1).astype(bool).reshape(-1)
    return _bits_to_bytes(np.concatenate([unary, rem])), {"k": k, "unary_bits": unary.size, "complement": complement}


def decode_positions(data: bytes, count: int, numel: int, meta: dict) -> torch.Tensor:
    k, n_unary, complement = int(meta["k"]), int(meta["unary_bits"]), bool(meta.get("complement"))
    if complement:
        count = numel - count
    bits = _bytes_to_bits(data, n_unary + count * k)
    stops = np.flatnonzero(~bits[:n_unary])
    if stops.size != count:
        raise CheckpointError("a compressed tensor's position code does not hold the count its header says")
    q = np.diff(stops, prepend=-1) - 1
    r = (bits[n_unary:].reshape(count, k).astype(np.int64) << np.arange(k)).sum(axis=1)
    pos = np.cumsum((q << k) + r + 1) - 1
    if pos.size and pos[-1] >= numel:
        raise CheckpointError("a compressed tensor's positions do not fit its shape")
    if complement:
        mask = np.ones(numel, dtype=bool)
        mask[pos] = False
        pos = np.flatnonzero(mask)
    return torch.from_numpy(pos.astype(np.int64))


def entropy_bits(count: int, numel: int) -> float:
    """The information in which ``count`` of ``numel`` positions are kept, plus one bit per sign:
    log2 C(numel, count) + count (the bound the coding is measured against)."""
    choose = (math.lgamma(numel + 1) - math.lgamma(count + 1) - math.lgamma(numel - count + 1)) / math.log(2)
    return choose + count


# ---- the file ---------------------------------------------------------------------------------


def save_compressed(path: str | os.PathLike, ternary: dict[str, Ternary], header: dict) -> int:
    """Write ``ternary`` (and ``header``'s fields) to ``path`` atomically; returns the bytes written."""
    payload, entries = bytearray(), []
    for name, t in ternary.items():
        positions, meta = encode_positions(t.positions, math.prod(t.shape))
        signs = _bits_to_bytes(t.negative.numpy())
        entries.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "count": t.positions.numel(), "scale": t.scale, "positions": meta,
                        "offset": len(payload), "position_bytes": len(positions), "sign_bytes": len(signs)})
        payload += positions + signs
    head = zlib.compress(json.dumps({**header, "format_version": FORMAT_VERSION, "payload_bytes": len(payload),
                                     "tensors": entries}, sort_keys=True).encode(), 9)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + bytes(payload)
    data = body + hashlib.sha256(body).digest()
    atomic_write_bytes(path, data)
    return len(data)


def is_compressed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts as a .qftc file does."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_header(path: str | os.PathLike) -> tuple[dict, bytes]:
    """(header, payload) of a .qftc file, checked: magic, version, lengths, checksum."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _PREFIX.size + _DIGEST or data[:4] != MAGIC:
        raise CheckpointError(f"{path} is not a qft compressed adapter (.qftc): wrong magic or too short")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version}, this qft reads version {FORMAT_VERSION}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if _PREFIX.size + head_len > len(body):
        raise CheckpointError(f"{path} is truncated (its header runs past the end); copy it again")
    try:
        header = json.loads(zlib.decompress(body[_PREFIX.size:_PREFIX.size + head_len]))
    except (zlib.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable header ({err}); the file is damaged") from err
    payload = body[_PREFIX.size + head_len:]
    if len(payload) != header.get("payload_bytes"):
        raise CheckpointError(f"{path} is truncated or padded: {len(payload)} payload bytes, its header says "
                              f"{header.get('payload_bytes')}; copy it again")
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path} is damaged: its checksum does not match; copy it again")
    return header, payload


def load_compressed(path: str | os.PathLike) -> tuple[dict, dict[str, Ternary]]:
    """(header, name -> Ternary) from a .qftc file (see :func:`read_header` for the checks)."""
    header, payload = read_header(path)
    out = {}
    for e in header["tensors"]:
        start, n_pos = e["offset"], e["position_bytes"]
        shape, count = tuple(e["shape"]), e["count"]
        positions = decode_positions(payload[start:start + n_pos], count, math.prod(shape), e["positions"])
        signs = _bytes_to_bits(payload[start + n_pos:start + n_pos + e["sign_bytes"]], count)
        out[e["name"]] = Ternary(shape, positions, torch.from_numpy(signs.copy()), float(e["scale"]),
                                 getattr(torch, e["dtype"]))
    return header, out


# ---- adapters ---------------------------------------------------------------------------------

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ALPHA_RATIO = 1.25  # the search's grid: the least-squares α times ALPHA_RATIO**k
ALPHA_MAX_STEPS = 12  # the farthest the search walks from the least-squares α, either way (1.25**12 ≈ 15)


def _source(folder: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """("qft" or "peft", the adapter's own header or config, its tensors)."""
    from safetensors.torch import load_file

    from qft.files.adapters import HEADER, read_adapter

    if (folder / HEADER).is_file():
        header, tensors = read_adapter(folder)
        return "qft", header, tensors
    if (folder / PEFT_CONFIG).is_file():
        config = json.loads((folder / PEFT_CONFIG).read_text())
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{folder}: a {config.get('peft_type')} adapter; qft compresses LoRA adapters")
        return "peft", config, load_file(folder / PEFT_WEIGHTS)
    raise CheckpointError(f"{folder} is neither a qft adapter ({HEADER}) nor a PEFT adapter ({PEFT_CONFIG})")


def _initial(base, header: dict, names) -> dict[str, torch.Tensor]:
    """A qft adapter's starting values: the adapters of ``base`` (the model as prepared, or its
    checkpoint folder), which must be the base the adapter was trained on."""
    from qft.files.adapters import adapter_tensors, base_fingerprint

    if base is None:
        raise ValueError("a qft adapter's update is relative to its starting values, which live in the base "
                         "it was trained from: pass base= (the prepared model or its checkpoint folder)")
    model = load_base(base)
    if base_fingerprint(model) != header.get("base_sha256"):
        raise ValueError("this adapter was made for another base model (the frozen weights differ); "
                         "pass the checkpoint it was trained from")
    params = adapter_tensors(model)
    missing = sorted(set(names) - params.keys())
    if missing:
        raise ValueError(f"the base has no adapter named {missing[:3]}")
    return {name: params[name].detach().cpu().clone() for name in names}  # a copy: the search writes params


def load_base(base):
    """A model as given, or loaded from its folder (a qft checkpoint, or a transformers model)."""
    if not isinstance(base, (str, os.PathLike)):
        return base
    from qft.files.checkpoint import load_quantized, read_config

    quant = read_config(base).get("quantization_config") or {}
    if quant.get("quant_method") == "qft":
        return load_quantized(base)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def compress_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, density: float,
                     alpha: float | None = None, base=None, tokenizer=None, texts=None,
                     score: Callable[[torch.nn.Module], float] | None = None, scope: str = "tensor",
                     progress: bool = True) -> dict:
    """Compress the adapter folder ``adapter`` (qft's ``save_adapter`` or PEFT's ``save_pretrained``) to
    the .qftc file ``out``; returns its :func:`info`.

    base: for a qft adapter, the model it was trained from as prepared (or that checkpoint's folder):
      the update is measured from its adapters, and its fingerprint must match.
    alpha: the scale's multiple of σ; None searches it (:func:`best_alpha`) for the lowest perplexity of the
      base with the compressed adapter on ``texts`` (default: 4 blocks of the embedded corpus's *train*
      split, so the held-out split stays unseen), with a progress bar; needs ``base`` and ``tokenizer``
      (for a PEFT adapter, base is the transformers model it applies to).
    score: what the search maximises instead of minus that perplexity: ``score(model)``, the base with the
      compressed adapter applied; for a task adapter, e.g. its accuracy on training items (on SST-2 it chose
      the same α as the perplexity at 10 and 20 %: RESULTS.md). Needs ``base``, not ``tokenizer``.
    scope: "tensor" (each tensor its own top-k and σ) or "global" (the paper's: one over all): :func:`compress`.
    """
    folder = Path(adapter)
    kind, own, tensors = _source(folder)
    initial = _initial(base, own, tensors) if kind == "qft" else {n: torch.zeros_like(t) for n, t in tensors.items()}
    update = {n: tensors[n].float() - initial[n].float() for n in tensors}
    ternary = compress(update, density, 1.0, scope=scope)
    if alpha is None:
        alpha = _search_alpha(kind, folder, base, tokenizer, texts, score, initial, update, ternary, progress)
    for t in ternary.values():
        t.scale *= alpha
    header = {"kind": kind, "adapter": own, "density": density, "alpha": alpha, "scope": scope,
              "method": own.get("method") if kind == "qft" else "peft-lora",
              "base_sha256": own.get("base_sha256") if kind == "qft" else _peft_base_hash(base)}
    save_compressed(out, ternary, header)
    return info(out)


def _peft_base_hash(base) -> str | None:
    """A PEFT adapter's base, when given: the SHA-256 of its state dict (checked again on decompress)."""
    from qft.files.adapters import base_fingerprint

    return None if base is None else base_fingerprint(load_base(base))


def _applied(initial: dict[str, torch.Tensor], ternary: dict[str, Ternary]) -> dict[str, torch.Tensor]:
    return {n: (initial[n].float() + t.to_dense().float()).to(initial[n].dtype) for n, t in ternary.items()}


def best_alpha(score: Callable[[float], float], start: float, *, progress: bool = False) -> float:
    """The α of the highest ``score(α)`` on the grid start · ALPHA_RATIO**k: from k = 0 it walks up while the
    score rises, else down while it rises (the score of α has one peak: an update scaled too little or too
    much both cost). A fixed grid of 0.5–2 × start clipped it: SST-2's adapter wanted 3× at 10 % density."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="ComPEFT alpha", unit="try", disable=not progress)
    scores: dict[int, float] = {}

    def tried(k: int) -> float:
        scores[k] = score(start * ALPHA_RATIO**k)
        bar.update()
        return scores[k]

    tried(0)
    for direction in (1, -1):
        k = direction
        while abs(k) <= ALPHA_MAX_STEPS and tried(k) > scores[k - direction]:
            k += direction
        if max(scores, key=scores.get) != 0:  # it rose going up: the peak is there
            break
    bar.close()
    best = max(scores, key=scores.get)
    logger.info("ComPEFT alpha: %.4g (least-squares %.4g × %.4g; %d tried)", start * ALPHA_RATIO**best, start,
                ALPHA_RATIO**best, len(scores))
    return start * ALPHA_RATIO**best


def _search_alpha(kind, folder, base, tokenizer, texts, score, initial, update, ternary, progress) -> float:
    from qft.files.data import calibration_blocks
    from qft.training.evaluate import perplexity

    if base is None or (tokenizer is None and score is None):
        raise ValueError("give alpha=, or base= and tokenizer= to choose it on validation text (or base= and "
                         "score=)")
    model = load_base(base)
    if kind == "peft":
        import copy

        from peft import PeftModel, set_peft_model_state_dict

        model = PeftModel.from_pretrained(copy.deepcopy(model), folder)  # the caller's model stays as it is

        def apply(values):
            set_peft_model_state_dict(model, values)
    else:
        from qft.files.adapters import adapter_tensors

        params = adapter_tensors(model)

        def apply(values):
            with torch.no_grad():
                for name, value in values.items():
                    params[name].copy_(value)

    if score is None:
        blocks = calibration_blocks(tokenizer, texts, max_blocks=None)[-4:]

        def score(m):
            return -perplexity(m, tokenizer, blocks, progress=False)

    def scored(alpha: float) -> float:
        apply(_applied(initial, {n: Ternary(t.shape, t.positions, t.negative, t.scale * alpha, t.dtype)
                                 for n, t in ternary.items()}))
        return score(model)

    try:
        return best_alpha(scored, least_squares_alpha(update, ternary), progress=progress)
    finally:
        apply(initial)  # the base as it came: its adapters at their starting values


def decompress_adapter(file: str | os.PathLike, out: str | os.PathLike, *, base=None) -> Path:
    """Write the adapter a .qftc file holds back as the kind it came from: a qft adapter folder
    (needs ``base``, whose starting values the update is added to) or a PEFT adapter folder
    (``base``, optional, is checked against the base recorded at compression, if one was)."""
    from safetensors.torch import save_file

    from qft.files.adapters import HEADER, WEIGHTS
    from qft.files.atomic import atomic_dir

    header, ternary = load_compressed(file)
    with atomic_dir(out) as tmp:
        if header["kind"] == "qft":
            values = _applied(_initial(base, header, ternary), ternary)
            save_file({n: v.contiguous() for n, v in values.items()}, str(tmp / WEIGHTS))
            (tmp / HEADER).write_text(json.dumps(header["adapter"], indent=1))
        elif header["kind"] == "peft":
            if base is not None and header.get("base_sha256") not in (None, _peft_base_hash(base)):
                raise ValueError(f"{file} was made for another base model (its weights differ from the one given)")
            save_file({n: t.to_dense().contiguous() for n, t in ternary.items()}, str(tmp / PEFT_WEIGHTS))
            (tmp / PEFT_CONFIG).write_text(json.dumps(header["adapter"], indent=2))
        else:
            raise CheckpointError(f"{file}: unknown adapter kind {header['kind']!r}")
    return Path(out)


def info(file: str | os.PathLike) -> dict:
    """What a .qftc file holds and how close its coding is to the entropy bound."""
    header, payload = read_header(file)
    entries = header["tensors"]
    params = sum(math.prod(e["shape"]) for e in entries)
    kept = sum(e["count"] for e in entries)
    bound = sum(entropy_bits(e["count"], math.prod(e["shape"])) for e in entries) / 8
    coded = sum(e["position_bytes"] + e["sign_bytes"] for e in entries)
    return {
        "kind": header["kind"], "method": header["method"], "density": header["density"],
        "alpha": header["alpha"], "scope": header["scope"], "tensors": len(entries), "parameters": params,
        "kept": kept, "file_bytes": Path(file).stat().st_size, "payload_bytes": len(payload),
        "entropy_bound_bytes": bound, "payload_over_bound": coded / bound if bound else 1.0,
        "fp16_bytes": 2 * params,
    }
