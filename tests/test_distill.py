"""LREC (INT2.1's objective): the loss as defined, the teacher's checks, and training that distils."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

import qft
from qft.methods.lrec import LREC


def _ids(seed=0, batch=2, length=24, vocab=300):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_lrec_equals_kl_plus_weighted_ce_computed_by_hand():
    student, teacher, ids = tiny_llama(seed=1), tiny_llama(seed=0), _ids()
    with torch.no_grad():
        s, t = student(input_ids=ids).logits.double(), teacher(input_ids=ids).logits.double()
        ce = float(student(input_ids=ids, labels=ids).loss)  # transformers' own shifted CE
        kl = 0.0
        for b in range(ids.shape[0]):
            for i in range(ids.shape[1]):
                p, q = t[b, i].softmax(0), s[b, i].softmax(0)
                kl += float((p * (p.log() - q.log())).sum())
        kl /= ids.numel()
        got = float(LREC(ce_weight=0.5)(student, ids, teacher=teacher))
        kl_only = float(LREC(ce_weight=0.0)(student, ids, teacher=teacher))
    assert got == pytest.approx(kl + 0.5 * ce, rel=1e-5) and kl_only == pytest.approx(kl, rel=1e-5)


def test_top_k_distils_the_teachers_most_likely_tokens():
    student, teacher, ids = tiny_llama(seed=1), tiny_llama(seed=0), _ids()
    with torch.no_grad():
        full = LREC(ce_weight=0.0)(student, ids, teacher=teacher)
        assert torch.allclose(LREC(ce_weight=0.0, top_k=300)(student, ids, teacher=teacher), full, rtol=1e-5)
        t, index = teacher(input_ids=ids).logits.topk(5, dim=-1)
        log_p = F.log_softmax(t, -1)
        log_q = F.log_softmax(student(input_ids=ids).logits, -1).gather(-1, index)
        expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        assert torch.allclose(LREC(ce_weight=0.0, top_k=5)(student, ids, teacher=teacher), expected, rtol=1e-5)


def test_teacher_checks():
    student, ids = tiny_llama(seed=1), _ids(vocab=200)
    with pytest.raises(ValueError, match="must share one tokenizer"):
        LREC()(student, ids, teacher=tiny_llama(vocab_size=200))
    with pytest.raises(ValueError, match="distils from a teacher"):
        LREC()(student, ids)
    model = qft.quantize_and_prepare(tiny_llama(seed=1), bits="nf4", method="qlora", rank=2, progress=False)
    blocks = _ids(length=16, batch=8)
    with pytest.raises(ValueError, match="does not learn from a teacher"):
        qft.train(model, None, blocks, blocks, teacher=tiny_llama(), steps=1, progress=False)
    with pytest.raises(ValueError, match="separate full-precision model"):
        qft.train(model, None, blocks, blocks, teacher=model, objective="lrec", steps=1, progress=False)
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        LREC(ce_weight=-1)


def test_training_with_lrec_moves_the_student_towards_a_bf16_teacher():
    def sharp():  # a random model's next-token distributions are nearly uniform; a larger head sharpens them
        model = tiny_llama(seed=0)
        with torch.no_grad():
            model.lm_head.weight.mul_(30)
        return model

    teacher = sharp().to(torch.bfloat16)  # another dtype: logits come back as float32
    student = qft.quantize_and_prepare(sharp(), bits="int2-g32", method="qlora", rank=8, progress=False)
    blocks = _ids(seed=1, batch=8, length=32)
    objective = LREC(ce_weight=0.0)
    with torch.no_grad():
        before = float(objective(student, blocks, teacher=teacher))
    qft.train(student, None, blocks, blocks, teacher=teacher, objective="lrec", steps=20, batch_size=4, lr=1e-2,
              warmup=1, eval_blocks=0, progress=False)
    with torch.no_grad():
        after = float(objective(student, blocks, teacher=teacher))
    assert after < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())  # run, never trained
