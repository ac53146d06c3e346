"""qft.train on a tiny Llama: what changes, resuming, the schedule, bf16, objectives; and transformers.Trainer."""

import json
import logging
import math

import pytest
import torch
from helpers import Chars, tiny_llama
from safetensors.torch import load_file

import qft
from qft.files.data import completion_blocks
from qft.nn import QLinear
from qft.training.loop import (OBJECTIVES, TrainConfig, TrainResult, _load_checkpoint, _trainable, latest_checkpoint,
                       register_objective)

SETTINGS = dict(steps=6, batch_size=2, block_size=16, lr=5e-3, warmup=2, seed=3)


def prepared(seed=0):
    model = tiny_llama(seed)
    return qft.quantize_and_prepare(model, bits="nf4", method="loftq", rank=4, progress=False)


def data(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, 16), generator=gen), torch.randint(0, 300, (3, 16), generator=gen)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_only_high_precision_parts_change_and_loss_falls():
    model = prepared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_blocks, eval_blocks = data(n=4)
    result = qft.train(model, None, train_blocks, eval_blocks, progress=False,
                       **{**SETTINGS, "steps": 30, "lr": 2e-2})
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    assert len(changed) == 2 * 14  # every factor of every layer moved
    assert result.losses[-1] < result.losses[0] - 0.5  # it memorises four blocks
    assert [s for s, _ in result.evals] == [0, 30]
    assert result.tokens == 30 * 2 * 16 and result.trainable_parameters == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))


def test_same_seed_same_weights():
    runs = []
    for _ in range(2):
        model = prepared()
        qft.train(model, None, *data(), progress=False, **SETTINGS)
        runs.append(trainable_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, precision):
    straight = prepared()
    qft.train(straight, None, *data(), progress=False, grad_accum=2, precision=precision, **SETTINGS)

    class Interrupt(Exception):
        pass

    interrupted = prepared()
    calls = {"n": 0}
    original_forward = interrupted.forward

    def forward_then_stop(*args, **kwargs):  # dies in the middle of step 4 (after checkpoint-3 was written)
        calls["n"] += 1
        if calls["n"] == 2 + 3 * 2 + 2:  # evaluation (2 batches), 3 steps of 2 micro-batches, then one more
            raise Interrupt
        return original_forward(*args, **kwargs)

    interrupted.forward = forward_then_stop
    with pytest.raises(Interrupt):
        qft.train(interrupted, None, *data(), progress=False, grad_accum=2, output_dir=tmp_path, save_every=3,
                  precision=precision, **SETTINGS)
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"

    resumed = prepared()  # a fresh process would start from the untrained model, too
    result = qft.train(resumed, None, *data(), progress=False, grad_accum=2, output_dir=tmp_path, save_every=3,
                       resume=True, precision=precision, **SETTINGS)
    assert result.steps_run == 3 and len(result.losses) == 6
    a, b = trainable_state(straight), trainable_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["precision"] == precision and state["objective"] == "ce"


def test_resume_refuses_other_settings(tmp_path):
    model = prepared()
    qft.train(model, None, *data(), progress=False, output_dir=tmp_path, **SETTINGS)
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        qft.train(prepared(), None, *data(), progress=False, output_dir=tmp_path, resume=True,
                  **{**SETTINGS, "lr": 1e-3})
    with pytest.raises(ValueError, match="other settings.*'precision': \\('fp32', 'bf16'\\)"):
        qft.train(prepared(), None, *data(), progress=False, output_dir=tmp_path, resume=True, precision="bf16",
                  **SETTINGS)


def test_restored_moments_sit_on_the_parameters_device(tmp_path):
    qft.train(prepared(), None, *data(), progress=False, output_dir=tmp_path, precision="bf16", **SETTINGS)
    # the meta device stands in for an accelerator: the checkpoint's tensors are loaded on the CPU
    params = _trainable(prepared().to("meta"))
    optimizer = torch.optim.AdamW(params.values(), foreach=False)
    config = TrainConfig(**SETTINGS, precision="bf16")
    step = _load_checkpoint(tmp_path / "checkpoint-6", params, optimizer, config, TrainResult(0, 0, 0.0, 0), "ce")
    assert step == 6 and len(optimizer.state) == len(params) == 2 * 14
    for p in params.values():
        state = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].device == p.device and state[key].dtype == torch.float32
        assert state["step"].device.type == "cpu" and state["step"].shape == () and float(state["step"]) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_checkpoint_resumes_on_cuda(tmp_path):
    on_cpu = prepared()
    qft.train(on_cpu, None, *data(), progress=False, output_dir=tmp_path, save_every=3, precision="bf16", **SETTINGS)
    on_cuda = prepared().to("cuda")
    result = qft.train(on_cuda, None, *data(), progress=False, output_dir=tmp_path / "cuda", save_every=3,
                       resume=tmp_path / "checkpoint-3", precision="bf16", **SETTINGS)
    assert result.steps_run == 3 and all(math.isfinite(x) for x in result.losses)
    assert "__cuda_rng__" in load_file(tmp_path / "cuda" / "checkpoint-6" / "optimizer.safetensors")
    a, b = trainable_state(on_cpu), trainable_state(on_cuda)
    assert all(b[k].is_cuda and torch.allclose(a[k], b[k].cpu(), atol=1e-2) for k in a)


def test_resume_with_other_shapes_changes_nothing(tmp_path):
    qft.train(prepared(), None, *data(), progress=False, output_dir=tmp_path, **SETTINGS)
    other = prepared()
    last = other.model.layers[1].mlp.down_proj  # only the last layer differs: the others would be copied first
    other.model.layers[1].mlp.down_proj = QLinear(last.weight.detach(), rank=2)
    before = trainable_state(other)
    with pytest.raises(ValueError, match="has shape"):
        qft.train(other, None, *data(), progress=False, output_dir=tmp_path, resume=True, **SETTINGS)
    after = trainable_state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoints_are_pruned_and_complete(tmp_path):
    qft.train(prepared(), None, *data(), progress=False, output_dir=tmp_path, save_every=1, keep=2, **SETTINGS)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-5", "checkpoint-6"]
    assert {p.name for p in (tmp_path / "checkpoint-6").iterdir()} == {
        "trainable.safetensors", "optimizer.safetensors", "trainer_state.json"}


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [config.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] > 0.1 and config.lr_at(100) == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_weights():
    """With checkpointing on, backward runs each decoder layer's forward again (counted as calls of a module
    inside the layer, in train mode, so evaluation does not count), and the weights end as without it."""
    runs, training_forwards = [], []
    for checkpointing in (False, True):
        model = prepared()
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: calls.append(module.training))
        qft.train(model, None, *data(), progress=False, gradient_checkpointing=checkpointing, **SETTINGS)
        runs.append(trainable_state(model))
        training_forwards.append(sum(calls))
    assert training_forwards == [SETTINGS["steps"], 2 * SETTINGS["steps"]]
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-6) for k in runs[0])


def test_bf16_trains_fp32_master_weights_under_autocast(tmp_path):
    model = prepared()
    head_dtypes = set()
    model.lm_head.register_forward_hook(lambda module, args, out: head_dtypes.add(out.dtype))
    train_blocks, eval_blocks = data(n=4)
    result = qft.train(model, None, train_blocks, eval_blocks, progress=False, output_dir=tmp_path,
                       precision="bf16", **{**SETTINGS, "steps": 30, "lr": 2e-2})
    assert head_dtypes == {torch.bfloat16}  # training and evaluation forwards alike
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0] - 0.5  # it memorises four blocks
    assert result.evals[-1][1] < result.evals[0][1]
    assert all(p.dtype == torch.float32 for p in _trainable(model).values())
    moments = load_file(tmp_path / "checkpoint-30" / "optimizer.safetensors")
    exp_avg = [v for k, v in moments.items() if k.endswith(".exp_avg")]
    assert len(exp_avg) == 2 * 14 and all(v.dtype == torch.float32 for v in exp_avg)


def test_bf16_gives_a_bf16_model_fp32_trainable_parameters(caplog):
    model = prepared().to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="qft.training.loop"):
        result = qft.train(model, None, *data(), progress=False, precision="bf16", **SETTINGS)
    assert all(p.dtype == torch.float32 for p in _trainable(model).values())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # frozen weights are left as they are
    assert "28 trainable parameters converted to float32" in caplog.text
    assert all(math.isfinite(x) for x in result.losses)


def test_objective_hook_is_the_loss():
    def same_ce(model, ids):
        return model(input_ids=ids, labels=ids).loss

    def double_ce(model, ids):
        return 2 * model(input_ids=ids, labels=ids).loss

    runs = {}
    for name, objective in (("default", "ce"), ("same", same_ce), ("double", double_ce)):
        model = prepared()
        runs[name] = (qft.train(model, None, *data(), progress=False, objective=objective, **SETTINGS),
                      trainable_state(model))
    default, same, double = (runs[k][1] for k in ("default", "same", "double"))
    assert all(torch.equal(default[k], same[k]) for k in default)
    assert any(not torch.equal(default[k], double[k]) for k in default)
    assert runs["double"][0].losses[0] == pytest.approx(2 * runs["default"][0].losses[0])


def test_callable_objective_name_is_recorded(tmp_path):
    def my_loss(model, ids):
        return model(input_ids=ids, labels=ids).loss

    qft.train(prepared(), None, *data(), progress=False, output_dir=tmp_path, objective=my_loss, **SETTINGS)
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["objective"] == my_loss.__qualname__


def test_registered_objective_is_used_by_name():
    calls = []

    @register_objective("test-counting-ce")
    def counting_ce(model, ids):
        calls.append(ids.shape)
        return model(input_ids=ids, labels=ids).loss

    try:
        qft.train(prepared(), None, *data(), progress=False, objective="test-counting-ce", **SETTINGS)
        assert calls == [(2, 16)] * SETTINGS["steps"]
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test-counting-ce")
    finally:
        del OBJECTIVES["test-counting-ce"]


def test_completion_blocks_mask_exactly_the_prompts():
    ids, labels = completion_blocks(Chars(), [("ab", "c"), ("de", "fg"), ("h", "i")], block_size=4)
    text = "abc\n\ndefg\n\nhi\n\n"  # Chars has no EOS: completions end with a blank line, as token_blocks joins
    assert ids.tolist() == [[ord(c) for c in text[i:i + 4]] for i in (0, 4, 8)]  # 15 tokens: 3 whole blocks
    kept = "..c\n\n..fg\n\n.i\n\n"  # "." marks a masked prompt token
    assert labels.tolist() == [[-100 if c == "." else ord(c) for c in kept[i:i + 4]] for i in (0, 4, 8)]
    with pytest.raises(ValueError, match="fewer than one block"):
        completion_blocks(Chars(), [("ab", "c")], block_size=16)


def test_pairs_train_on_their_completions_only():
    gen = torch.Generator().manual_seed(0)
    prompts = ["".join(chr(97 + int(i)) for i in torch.randint(0, 26, (11,), generator=gen)) for _ in range(8)]
    pairs = [(p, "=ok") for p in prompts]
    model = prepared()
    ids, labels = completion_blocks(Chars(), pairs, block_size=16)
    with torch.no_grad():  # the whole data in one batch: the first step's loss, whatever the order
        expected = float(model(input_ids=ids, labels=labels).loss)
        every_token = float(model(input_ids=ids, labels=ids).loss)
    result = qft.train(model, Chars(), pairs, progress=False, steps=1, batch_size=len(ids), block_size=16,
                       lr=1e-6, warmup=0, eval_blocks=0)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5) and abs(expected - every_token) > 1e-3
    with pytest.raises(ValueError, match="takes no labels"):
        qft.train(prepared(), Chars(), pairs, progress=False, objective=lambda m, x: m(input_ids=x, labels=x).loss,
                  steps=1, batch_size=2, block_size=16, eval_blocks=0)
    with pytest.raises(ValueError, match="mixes texts and tuples"):
        qft.train(prepared(), Chars(), pairs + ["a text"], progress=False, steps=1, block_size=16, eval_blocks=0)


def test_unknown_objective_or_precision_is_refused():
    with pytest.raises(ValueError, match=r"unknown objective 'no-such-loss'; registered: \[.*'ce'"):
        qft.train(prepared(), None, *data(), progress=False, objective="no-such-loss", **SETTINGS)
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; choose from \['fp32', 'bf16'\]"):
        qft.train(prepared(), None, *data(), progress=False, precision="fp16", **SETTINGS)
    with pytest.raises(ValueError, match="choose from"):
        TrainConfig(precision="bfloat16")


def test_unprepared_model_is_refused():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="quantize_and_prepare"):
        qft.train(model, None, *data(), progress=False, **SETTINGS)


def test_transformers_trainer_trains_a_loaded_checkpoint(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    qft.save_quantized(prepared(), tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    lora = trainable_state(model)
    blocks, _ = data()
    dataset = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.equal(lora[k], dict(model.named_parameters())[k]) for k in lora)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLinear)
