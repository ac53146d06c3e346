"""Low-Rank Error Correction (INT2.1): train the adapters to make the quantized model talk like
the full-precision one.

loss = KL(teacher ‖ student) + ce_weight · CE, both as means over tokens (temperature 1, full
vocabulary). The reference scripts sum the KL over a sequence's 2048 tokens and add 120–200 × the
mean CE; per token that is a CE weight of about 0.06–0.1, hence the default 0.06.

The teacher runs alongside the student on each batch (streamed; the reference caches every
teacher logit on disk, over a terabyte for its data). It may sit on another device or in
another dtype: inputs go to it, its logits come back as float32. ``top_k`` distils only the
teacher's k most likely tokens (renormalised), which shrinks what has to be kept of the
teacher's output per token from the vocabulary to k; the student's log-probabilities stay
normalised over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qft.training.loop import register_objective


@dataclass(frozen=True)
class LREC:
    """The objective ``train(..., teacher=model, objective=LREC(ce_weight=..., top_k=...))``."""

    ce_weight: float = 0.06
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for the whole vocabulary), got {self.top_k}")

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("objective 'lrec' distils from a teacher: pass train(..., teacher=full_precision_model)")
        logits = model(input_ids=input_ids).logits.float()
        target = teacher_logits(teacher, input_ids, logits.shape[-1]).to(logits.device)
        log_student = F.log_softmax(logits, dim=-1)
        if self.top_k is None:
            log_teacher = F.log_softmax(target, dim=-1)
        else:
            target, index = target.topk(self.top_k, dim=-1)
            log_teacher = F.log_softmax(target, dim=-1)
            log_student = log_student.gather(-1, index)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()
        if self.ce_weight == 0:
            return kl
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        return kl + self.ce_weight * ce


def teacher_logits(teacher: nn.Module, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's float32 logits for ``input_ids`` (on the teacher's device), checked against the
    student's vocabulary size."""
    device = next(teacher.parameters()).device
    if teacher.training:
        teacher.eval()
    with torch.no_grad():
        logits = teacher(input_ids=input_ids.to(device)).logits
    if logits.shape[-1] != vocab:
        raise ValueError(f"the teacher predicts over {logits.shape[-1]} tokens, the student over {vocab}: "
                         "distillation compares token distributions, so both must share one tokenizer and vocabulary")
    return logits.float()


register_objective("lrec")(LREC())
