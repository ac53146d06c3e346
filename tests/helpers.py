"""Small models shared by the tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qft.prepare.allocate import nf_grid

# a 48-format slice of the grid keeps allocation tests fast
SMALL_GRID = [f for f in nf_grid() if f.scale_bits in (None, 8) and f.second_level == "fp32"]


def tiny_llama(seed: int = 0, vocab_size: int = 300) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 64), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def small_tokenizer():
    """A byte-level BPE tokenizer of 264 tokens with Qwen2's split regex (Qwen2's own needs a hub). Most tests
    use it: a GGUF holding SmolLM2's 49152 tokens takes seconds for gguf's reader to parse."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


class Chars:
    """A character-level tokenizer for the tiny models (vocabulary 300)."""

    eos_token = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 300 for c in text]])})()

    def save_pretrained(self, directory) -> None:
        """Nothing to write: exports that save their tokenizer take this one too."""


CALIBRATION = ["the quick brown fox jumps over the lazy dog; " * 60, "pack my box with five dozen liquor jugs. " * 60]


def assert_exports_read_back_as(model, ids, dense, peft, merged, rounding: float = 0.2) -> None:
    """The dense export and the PEFT export give the qft model's logits; the merged int4 export is
    within its second rounding (``rounding`` times the logits' norm)."""
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(dense(ids).logits, ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(peft(ids).logits, ours, rtol=1e-4, atol=1e-5)
        assert (merged(ids).logits - ours).norm() < rounding * ours.norm()


def tiny_with_smollm2_tokenizer(folder):
    """A tiny Llama folder with SmolLM2's real tokenizer: what the command line and quantize-on-load read
    calibration text with."""
    from transformers import AutoTokenizer

    from qft.files.models import DEFAULT_GGUF, default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
