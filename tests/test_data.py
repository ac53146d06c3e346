"""load_texts: files, saved datasets, chat messages; token blocks."""

import json

import pytest
import torch

import qft
from qft.files.data import load_texts, token_blocks

RECORDS = [f"record number {i}: " + "words " * (i % 7) for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qft.files.models import DEFAULT_GGUF, default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)


def write(tmp_path, kind):
    import datasets

    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in RECORDS))
    elif kind == "json":
        path.write_text(json.dumps([{"text": t} for t in RECORDS]))
    elif kind == "parquet":
        datasets.Dataset.from_dict({"text": RECORDS}).to_parquet(str(path))
    elif kind == "disk":
        datasets.Dataset.from_dict({"text": RECORDS}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "disk"])
def test_record_files_split_into_disjoint_train_and_test(tmp_path, kind):
    path = write(tmp_path, kind)
    train, test = load_texts(path, "train"), load_texts(path, "test")
    assert sorted(train + test) == sorted(RECORDS)
    assert test and not set(train) & set(test)
    assert load_texts(path, "test") == test  # the split is stable


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("first line\nsecond line\n\nthird paragraph\n")
    texts = load_texts(path, "train", heldout_every=1_000_000_007)
    assert texts == ["first line\nsecond line\n\nthird paragraph\n"]


def test_saved_dataset_dict_uses_its_own_splits(tmp_path):
    import datasets

    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
                              "test": datasets.Dataset.from_dict({"text": ["c"]})})
    d.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(tmp_path / "dd", "train") == ["a", "b"]
    assert load_texts(tmp_path / "dd", "test") == ["c"]


def test_chat_messages_use_the_chat_template(tmp_path, tokenizer):
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(20)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    texts = load_texts(path, "train", tokenizer=tokenizer) + load_texts(path, "test", tokenizer=tokenizer)
    assert len(texts) == 20
    rendered = tokenizer.apply_chat_template(chats[3], tokenize=False)
    assert rendered in texts and "answer 3" in rendered and rendered != "answer 3"
    with pytest.raises(ValueError, match="chat template"):
        load_texts(path, "train")


def test_unknown_columns_and_files_are_explained(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"columns \['body'\].*text_field="):
        load_texts(path)
    assert load_texts(path, text_field="body", heldout_every=1_000_000_007) == ["hello"]
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt, \.json, \.jsonl or \.parquet"):
        load_texts(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "nothing.jsonl")


def test_default_is_the_embedded_corpus():
    assert load_texts(None, "test") == list(qft.default_corpus()["test"]["text"])


def test_token_blocks_pack_texts_with_eos(tokenizer):
    blocks = token_blocks(tokenizer, ["alpha beta", "gamma delta"] * 50, block_size=32)
    assert blocks.dtype == torch.long and blocks.shape[1] == 32
    assert (blocks == tokenizer.eos_token_id).any()
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(tokenizer, ["short"], block_size=512)
