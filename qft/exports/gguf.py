"""Export to llama.cpp: a GGUF model file, and a llama.cpp LoRA adapter GGUF beside it.

``export_gguf(model, path, tokenizer)`` writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for
a Llama or Qwen2 causal LM (and transformers reads back with ``gguf_file=``):

- **Metadata** under llama.cpp's keys: ``general.architecture``/``type``/``name``/``file_type``,
  ``{arch}.context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
  ``attention.head_count``/``head_count_kv``, ``rope.freq_base``, ``rope.dimension_count``,
  ``attention.layer_norm_rms_epsilon``, ``vocab_size``, ``general.quantization_version``.
- **Tokenizer** (byte-level BPE, llama.cpp's "gpt2" model): tokens as the vocabulary spells them
  (ids the tokenizer lacks up to the embedding's rows become ``[PAD{i}]``, UNUSED), token types
  (added special tokens CONTROL, other added tokens USER_DEFINED), merges, bos/eos/unk/pad ids,
  ``add_bos_token`` (``add_eos_token`` only when set), ``add_space_prefix``, the chat template, and
  ``tokenizer.ggml.pre`` by :func:`tokenizer_pre`'s rule. SmolLM2's own GGUF stores these same keys.
- **Tensors** under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``,
  ``output``; Qwen2's q/k/v biases). No ``output`` tensor when the head is tied to the embeddings.
  For Llama the q and k rows are permuted from Hugging Face's rotary layout (halves) to GGUF's
  (interleaved pairs), as llama.cpp's converter does; a row permutation moves whole ggml blocks
  (they run along a row), so it is exact for quantized bytes too.

How each qft layer is written (``adapters``):

- ``"separate"``: the base alone. A layer whose format is one of llama.cpp's block formats
  (``qft.quant.formats.ggml``) goes out as its bytes, never rounded again; any other format (NF-k,
  int-k, FP8, HALO's cast base) is dequantized and written in ``dtype``. The low-rank factors go to
  :func:`export_gguf_lora`, which llama.cpp applies unmerged (``--lora``).
- ``"merged"``: dequant(Q) + scaling·B·A written in ``dtype``: one rounding, of the merged weight. A
  layer in a llama.cpp block format with nothing to merge (no low-rank factors, no trained scales:
  e.g. a QA-LoRA model after ``qft.methods.qalora.merge_qalora``, whose update is in its Q4_1 / Q5_1
  offsets) goes out as its bytes here too.
- ``"requantized"``: W + scaling·B·A rounded once into the layer's own llama.cpp type (round to
  nearest, or GPTQ on the type's own scales, each layer calibrated on the ones before it as rounded):
  one file of the base's size, no adapter. Every layer that merges something must be in a llama.cpp
  type.

Everything else (embeddings, a plain head) is written in ``dtype``; one-dimensional tensors (norms,
biases) always in f32, as llama.cpp's converter does. ``dtype="q8_0"`` falls back to f16 for a matrix
whose rows are not a whole number of 32-wide blocks, as the converter does.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from qft.exports.merged import rounded_once
from qft.files.atomic import atomic_path
from qft.methods.gptq import gptq
from qft.nn import QFT_LAYERS, qft_layers
from qft.nn.distributed import is_sharded
from qft.quant.formats.ggml import is_ggml, to_ggml
from qft.quant.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}  # transformers class -> llama.cpp arch
DTYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTERS = ("separate", "merged", "requantized")
SMOLLM_VOCAB = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0..2 of SmolLM/SmolLM2's 49152 tokens
# informational general.file_type of a file whose matrices are mostly of one ggml type
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
               "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
               "Q6_K": "MOSTLY_Q6_K"}


def architecture(model: nn.Module) -> str:
    """llama.cpp's architecture name for ``model`` ("llama", "qwen2"); ValueError for any other."""
    names = [c.__name__ for c in type(model).__mro__]
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"GGUF export supports {sorted(ARCHITECTURES)} (llama.cpp: "
                         f"{sorted(set(ARCHITECTURES.values()))}), not {type(model).__name__}")
    if is_sharded(model):
        raise ValueError("the model is sharded (FSDP); gather it on one process before a GGUF export")
    return arch


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not written to GGUF by qft; only plain RoPE models export")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def llama_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order that takes a Llama q or k projection (``n_head`` heads, HF's rotary halves) to GGUF's
    interleaved pairs, as llama.cpp's converter permutes it: ``gguf_rows = hf_rows[perm]``."""
    half = rows // n_head // 2
    if n_head * 2 * half != rows:
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return np.arange(rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def _permutation(arch: str, gguf_name: str, rows: int, config) -> np.ndarray | None:
    """The row permutation llama.cpp applies to this tensor, or None."""
    if arch != "llama":
        return None
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if kind == "attn_q":
        return llama_permutation(rows, config.num_attention_heads)
    if kind == "attn_k":
        return llama_permutation(rows, config.num_key_value_heads)
    return None


class _Names:
    """Hugging Face parameter names -> llama.cpp tensor names (gguf's own table)."""

    def __init__(self, arch: str, n_blocks: int) -> None:
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        self.map = gguf.get_tensor_name_map(arch_id, n_blocks)

    def __call__(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_name} has no llama.cpp tensor name; the GGUF export cannot place it")
        return name


def _encode(array: np.ndarray, dtype: str, name: str):
    """``array`` (float32) as written in ``dtype``: (data, raw ggml type or None). 1-D tensors stay f32."""
    if array.ndim <= 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if array.shape[-1] % block:
        logger.info("%s: rows of %d are not whole Q8_0 blocks of %d; written in f16", name, array.shape[-1], block)
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def _tied_head(model: nn.Module) -> str | None:
    """The output head's module name when it is the input embeddings (llama.cpp then writes no ``output``
    tensor, and reads the head from ``token_embd``), else None."""
    head = model.get_output_embeddings()
    if head is None or isinstance(head, QFT_LAYERS):
        return None
    embed = model.get_input_embeddings().weight
    if head.weight is not embed and head.weight.data_ptr() != embed.data_ptr():
        return None
    return next(n for n, m in model.named_modules() if m is head)


# -- the tokenizer ---------------------------------------------------------------------------------

def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export reads fast (tokenizers) tokenizers; got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _pre_tokenizers(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return list(spec.get("pretokenizers", [])) if spec.get("type") == "Sequence" else [spec]


def _split_regex(step: dict) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") if step.get("type") == "Split" else None


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, by this rule:

    - SmolLM's vocabulary (49152 tokens starting <|endoftext|>, <|im_start|>, <|im_end|>), or a
      pre-tokenizer that splits digits one by one before GPT-2's regex: "smollm";
    - a Split on Qwen2's regex: "qwen2";
    - GPT-2's own byte-level regex and nothing else: "gpt-2";
    - anything else: "default" (llama.cpp's generic split), with a warning: pass ``pre=`` to say.

    llama.cpp's converter identifies a tokenizer by a hash of its output on a test text; qft names the
    ones it can tell by their structure instead."""
    spec = _backend_json(tokenizer)
    vocab = tokenizer.get_vocab()
    steps = _pre_tokenizers(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    first = {i: t for t, i in vocab.items() if i < len(SMOLLM_VOCAB)}
    if len(vocab) == 49152 and tuple(first.get(i) for i in range(len(SMOLLM_VOCAB))) == SMOLLM_VOCAB:
        return "smollm"
    byte_level_regex = kinds[-1:] == ["ByteLevel"] and steps[-1].get("use_regex", True)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
        return "smollm"
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as qwen2
    except ImportError:
        qwen2 = None
    if qwen2 is not None and any(_split_regex(s) == qwen2 for s in steps):
        return "qwen2"
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"
    logger.warning("the tokenizer's pre-tokenizer (%s) is not one qft names for llama.cpp; tokenizer.ggml.pre is "
                   "'default', which may split text differently: pass pre= with llama.cpp's name for it", kinds)
    return "default"


def _add_tokenizer(writer, tokenizer, n_vocab: int, pre: str | None) -> None:
    """The tokenizer's keys, as llama.cpp's converter writes them for a byte-level BPE vocabulary."""
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    byte_level = any(s.get("type") == "ByteLevel" for s in _pre_tokenizers(spec.get("pre_tokenizer")))
    if model.get("type") != "BPE" or not byte_level:
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style, llama.cpp's 'gpt2'); this one is "
                         f"{model.get('type')} with pre-tokenizer {spec.get('pre_tokenizer')}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())}, the model's embeddings only "
                         f"{n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "add_eos_token", False):  # llama.cpp's default is off: written only when on
        writer.add_add_eos_token(True)
    steps = _pre_tokenizers(spec.get("pre_tokenizer"))
    prefix = [s.get("add_prefix_space") for s in steps if s.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(prefix and prefix[0]))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# -- the model -------------------------------------------------------------------------------------

def _add_hyperparameters(writer, model: nn.Module, name: str, file_type: int) -> None:
    config = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(file_type)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_rope_dimension_count(_head_dim(config))


def _merges(layer: nn.Module) -> bool:
    """Whether merging changes ``layer``'s weight: it has low-rank factors or trained scales (else its
    bytes are its merged weight)."""
    return bool(getattr(layer, "rank", 0)) or getattr(layer, "scale", None) is not None


def _requantized(model: nn.Module, layers: dict[str, nn.Module], tokenizer, rounding: str,
                 calibration: list[str] | None, progress: bool) -> dict[str, QuantizedTensor]:
    """W + scaling·B·A of every layer that merges something, rounded once into the layer's own llama.cpp type."""
    names = [n for n, m in layers.items() if _merges(m)]
    foreign = {n: getattr(getattr(layers[n], "weight", None), "format", None) for n in names}
    foreign = {n: f for n, f in foreign.items() if f is None or not is_ggml(f)}
    if foreign:
        name, fmt = next(iter(foreign.items()))
        kind = getattr(fmt, "name", type(layers[name]).__name__)
        raise ValueError(f"adapters='requantized' rounds each merged weight into the layer's own llama.cpp type, "
                         f"but {len(foreign)} layers (e.g. {name}: {kind}) "
                         "are in none; quantize with formats= from qft.quant.formats.ggml.GGML_TYPES, or export "
                         "with adapters='merged' (dense)")

    def round_one(name: str, weight: torch.Tensor, hessian: torch.Tensor | None):
        fmt = layers[name].weight.format
        q = QuantizedTensor.quantize(weight, fmt) if hessian is None else gptq(weight, fmt, hessian, act_order=True)
        return q, q.dequantize(torch.float32)

    return dict(rounded_once(model, names, round_one, rounding=rounding, tokenizer=tokenizer,
                             calibration=calibration, progress=progress))


def _layer_tensor(layer: nn.Module, adapters: str, dtype: str, gguf_name: str, perm: np.ndarray | None,
                  rounded: QuantizedTensor | None):
    """A qft layer's weight as written: ggml bytes (its own, or ``rounded``: its merged weight rounded once
    into its type) when it may be, else dense in ``dtype``."""
    weight = rounded if rounded is not None else getattr(layer, "weight", None)
    fmt = getattr(weight, "format", None)
    if (adapters == "separate" or rounded is not None or not _merges(layer)) and fmt is not None and is_ggml(fmt):
        data, qtype = to_ggml(weight)
        data = np.asarray(data, dtype=np.uint8).reshape(layer.out_features, -1)
        return (data if perm is None else data[perm]), qtype, True
    if not hasattr(layer, "merged_weight") or not hasattr(layer, "base_weight"):
        raise ValueError(f"{type(layer).__name__} has no dense weight to export; GGUF export writes QLinear and "
                         "HaloLinear layers")
    with torch.no_grad():
        dense = layer.merged_weight(torch.float32) if adapters == "merged" else layer.base_weight(torch.float32)
    array = _numpy(dense)
    return (*_encode(array if perm is None else array[perm], dtype, gguf_name), False)


def _add_layer(tensors: dict, names: _Names, arch: str, config, module: str, layer: nn.Module, adapters: str,
               dtype: str, rounded: QuantizedTensor | None) -> list[str]:
    """Put one qft layer's weight (and bias) into ``tensors``; the ggml type names it wrote."""
    gguf_name = names(f"{module}.weight")
    perm = _permutation(arch, gguf_name, layer.out_features, config)
    data, qtype, kept = _layer_tensor(layer, adapters, dtype, gguf_name, perm, rounded)
    tensors[gguf_name] = (data, qtype)
    if getattr(layer, "bias", None) is not None:
        bias = _numpy(layer.bias)
        tensors[names(f"{module}.bias")] = (bias if perm is None else bias[perm], None)
    return [qtype.name] if kept else []


def _file_type(written: Counter, dtype: str) -> int:
    kind = written.most_common(1)[0][0] if written else dtype.upper()
    return int(gguf.LlamaFileType[_FILE_TYPES.get(kind, _FILE_TYPES[dtype.upper()])])


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer, *, dtype: str = "f16",
                adapters: str = "separate", rounding: str = "rtn", calibration: list[str] | None = None,
                name: str | None = None, pre: str | None = None, progress: bool = True) -> Path:
    """Write ``model`` (a Llama or Qwen2 causal LM, qft layers or not) as one llama.cpp GGUF file at ``path``
    (module doc): llama.cpp (``llama-cli -m path``) and transformers (``gguf_file=``) read it.

    dtype: of every dense matrix: "f16" (default), "f32", "bf16" or "q8_0"; norms and biases are f32.
    adapters: "separate" (the base only, llama.cpp-format layers byte for byte; write the LoRA with
      :func:`export_gguf_lora`), "merged" (W + scaling·B·A rounded once to ``dtype``) or "requantized"
      (W + scaling·B·A rounded once into each layer's own llama.cpp type: the size of the base, one file).
    rounding: for "requantized", "rtn" (round to nearest) or "gptq" (GPTQ with act-order on the type's own
      scales, over ``calibration`` texts, default the embedded corpus's train split).
    name: ``general.name`` (default: the model's folder name). pre: ``tokenizer.ggml.pre`` (default:
      :func:`tokenizer_pre`'s rule)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {list(DTYPES)}")
    if adapters not in ADAPTERS:
        raise ValueError(f"adapters {adapters!r}: choose one of {list(ADAPTERS)}")
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: pass the model's tokenizer")
    arch = architecture(model)
    config = model.config
    _check_rope(config)
    names = _Names(arch, config.num_hidden_layers)
    layers = qft_layers(model)
    head = _tied_head(model)
    rounded = (_requantized(model, layers, tokenizer, rounding, calibration, progress)
               if adapters == "requantized" else {})
    tensors: dict[str, tuple[np.ndarray, object]] = {}
    native: Counter = Counter()
    done: set[str] = set()
    for key, value in model.state_dict().items():  # in the model's order, as llama.cpp's converter writes them
        module, _, leaf = key.rpartition(".")
        if module in layers:
            if module not in done:
                done.add(module)
                native.update(_add_layer(tensors, names, arch, config, module, layers[module], adapters, dtype,
                                         rounded.get(module)))
            continue
        if leaf == "inv_freq" or not value.is_floating_point() or (head is not None and module == head):
            continue
        gguf_name = names(key)
        array = _numpy(value)
        perm = _permutation(arch, gguf_name, array.shape[0], config)
        tensors[gguf_name] = _encode(array if perm is None else array[perm], dtype, gguf_name)
    if adapters == "separate" and any(getattr(m, "rank", 0) for m in layers.values()):
        logger.info("the GGUF holds the base weights only; write the low-rank adapters with export_gguf_lora")
    n_vocab = model.get_input_embeddings().weight.shape[0]
    default_name = Path(str(getattr(config, "name_or_path", "") or "")).name or arch
    writer = gguf.GGUFWriter(None, arch)
    _add_hyperparameters(writer, model, name or default_name, _file_type(native, dtype))
    _add_tokenizer(writer, tokenizer, n_vocab, pre)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for gguf_name, (data, qtype) in tensors.items():
        writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=qtype)
    path = Path(path)
    with atomic_path(path) as tmp:
        _write(writer, tmp)
    logger.info("wrote %s: %d tensors (%s), %d in llama.cpp's own block formats", path, len(tensors), dtype,
                sum(native.values()))
    return path


def _write(writer, tmp: Path) -> None:
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()


# -- the LoRA adapter ------------------------------------------------------------------------------

def export_gguf_lora(model: nn.Module, path: str | os.PathLike, *, base_name: str | None = None,
                     dtype: str = "f32") -> Path:
    """Write ``model``'s low-rank factors as a llama.cpp LoRA adapter GGUF (``llama-cli -m base.gguf
    --lora path``), as llama.cpp's ``convert_lora_to_gguf.py`` lays it out.

    Per qft layer with factors, on the base tensor ``blk.N.attn_q.weight``: ``….lora_a`` = A, (rank, in)
    row-major (ggml ne = [in, rank]; a QA-LoRA layer's pooled A unpooled, :meth:`QLinear.unpooled_lora_A`), and ``….lora_b`` = B, (out, rank) (ne = [rank, out]); Llama's q/k rows of
    B permuted as :func:`export_gguf` permutes the base. llama.cpp scales each product by
    ``adapter.lora.alpha / rank``: alpha is written as the most common scaling·rank, and a layer whose
    scaling differs has the ratio folded into its B, so every layer's scale is qft's ``scaling``.
    dtype: of the factors, "f32" (default) or "f16". base_name: the base model's name, recorded as
    ``general.base_model.0.name``."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype {dtype!r}: LoRA factors are written in 'f32' or 'f16'")
    arch = architecture(model)
    config = model.config
    names = _Names(arch, config.num_hidden_layers)
    layers = {n: m for n, m in qft_layers(model).items() if getattr(m, "rank", 0) and m.lora_A is not None}
    if not layers:
        raise ValueError("the model has no qft layer with low-rank factors; there is no LoRA adapter to export "
                         "(a PEQA model's adapter is its scales: export it with export_gguf)")
    alphas = {n: m.scaling * m.rank for n, m in layers.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    if alpha == 0:
        alpha = 1.0
    folded = [n for n, a in alphas.items() if a != alpha]
    if folded:
        logger.info("%d layers (e.g. %s) scale their LoRA differently from alpha=%g; their ratio is folded into B",
                    len(folded), folded[0], alpha)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    default_name = Path(str(getattr(config, "name_or_path", "") or "")).name or arch
    writer.add_name(f"{base_name or default_name} LoRA")
    if base_name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)
    for module, layer in layers.items():
        base = names(f"{module}.weight")
        with torch.no_grad():
            # a pooled A (QA-LoRA) as the plain (rank, in) A of the same update, which llama.cpp applies
            a = _numpy(layer.unpooled_lora_A() if getattr(layer, "pool", 0) else layer.lora_A)
            b = _numpy(layer.lora_B) * np.float32(alphas[module] / alpha)
        perm = _permutation(arch, base, b.shape[0], config)
        if perm is not None:
            b = b[perm]
        writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a.astype(np_dtype)))
        writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b.astype(np_dtype)))
    path = Path(path)
    with atomic_path(path) as tmp:
        _write(writer, tmp)
    logger.info("wrote %s: LoRA on %d tensors, alpha %g", path, len(layers), alpha)
    return path
