"""The keyword form's default (issue 25): calibrated whenever it can be, data-free otherwise and said why."""

import json

import pytest
import torch
from helpers import CALIBRATION, SMALL_GRID, Chars, small_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM

import qft
from qft.cli import main
from qft.files.models import tokenizer_of

OPTIONS = dict(rank=4, formats=SMALL_GRID, cache_dir=False, progress=False)


def formats(model) -> list[str]:
    return [m.format for m in model.qft_report.matrices]


def test_a_budget_with_a_tokenizer_is_fisher_weighted_as_the_config_form_says():
    auto = qft.quantize_and_prepare(tiny_llama(), bits=3.0, tokenizer=Chars(), calibration=CALIBRATION, **OPTIONS)
    report = auto.qft_report
    assert report.fisher and auto.qft_config.fisher and report.notes == []
    assert report.calibration == "Fisher over 2 given texts"
    explicit = qft.quantize_and_prepare(tiny_llama(), bits=3.0, fisher=True, tokenizer=Chars(),
                                        calibration=CALIBRATION, **OPTIONS)
    assert formats(auto) == formats(explicit)
    assert report.total_error == explicit.qft_report.total_error
    plain = qft.quantize_and_prepare(tiny_llama(), bits=3.0, fisher=False, tokenizer=Chars(), **OPTIONS)
    assert not plain.qft_report.fisher and plain.qft_report.notes == []
    assert plain.qft_report.calibration == "none (data-free)"
    assert formats(plain) != formats(auto)  # the Fisher moved the allocation


@pytest.mark.parametrize("case", ["no tokenizer", "one format"])
def test_the_data_free_default_says_why(case, caplog):
    bits = 3.0 if case == "no tokenizer" else "nf4"
    tokenizer = None if case == "no tokenizer" else Chars()
    with caplog.at_level("INFO", logger="qft"):
        model = qft.quantize_and_prepare(tiny_llama(), bits=bits, tokenizer=tokenizer, **OPTIONS)
    report = model.qft_report
    assert not report.fisher and report.calibration == "none (data-free)"
    expected = "no tokenizer was passed or found" if case == "no tokenizer" else "one format (nf4) everywhere"
    assert len(report.notes) == 1 and expected in report.notes[0]
    assert expected in caplog.text


def test_a_folder_given_to_stream_is_data_free_and_says_so(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    model = qft.quantize_and_prepare(str(tmp_path / "m"), bits=3.0, **OPTIONS)
    assert not model.qft_report.fisher and "quantized streaming" in model.qft_report.notes[0]


def test_the_tokenizer_beside_the_model_files_is_found_and_calibrates(tmp_path):
    tokenizer = small_tokenizer()
    base = tiny_llama(vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    found = tokenizer_of(model)
    assert found is not None and found("the tower").input_ids == tokenizer("the tower").input_ids
    assert tokenizer_of(tiny_llama()) is None  # built from a config: no files
    model = qft.quantize_and_prepare(model, bits=3.0, calibration=CALIBRATION, **OPTIONS)
    assert model.qft_report.fisher and model.qft_report.notes == []
    # the explicit requests find it too
    gptq = qft.quantize_and_prepare(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), bits="nf4", method="qlora",
                                    rounding="gptq", calibration=CALIBRATION, **OPTIONS)
    assert gptq.qft_report.calibration == "GPTQ Hessians over 2 given texts"


def test_the_command_calibrates_unless_told_not_to(tmp_path):
    tokenizer = small_tokenizer()
    torch.manual_seed(0)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    common = ["quantize", "--model", str(tmp_path / "m"), "--bits", "3.0", "--rank", "4", "--quiet"]
    main(common + ["--out", str(tmp_path / "auto")])
    main(common + ["--no-fisher", "--out", str(tmp_path / "plain")])
    saved = {k: json.loads((tmp_path / k / "config.json").read_text())["quantization_config"] for k in ("auto", "plain")}
    assert saved["auto"]["config"]["fisher"] and not saved["plain"]["config"]["fisher"]
    assert saved["auto"]["report"]["calibration"] == "Fisher over the embedded corpus's train split"
    assert saved["plain"]["report"]["calibration"] == "none (data-free)"
