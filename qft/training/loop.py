"""qft's own training loop: only the parameters that require grad change.

Causal-LM loss on fixed-length token blocks, AdamW, linear warm-up then cosine
decay, gradient accumulation and clipping, optional gradient checkpointing,
held-out perplexity every ``eval_every`` steps. The batch order is a pure
function of (seed, step), so a run resumed from a checkpoint (trainable
weights, AdamW moments, RNG state, step) ends with the same weights, bit for
bit, as one that never stopped, on whichever device it resumes. Checkpoints
are safetensors + JSON, written to a temporary folder and renamed.

precision="bf16" runs every forward under bf16 autocast while the trainable
parameters and AdamW's moments stay fp32 (master weights). The loss is a
pluggable objective (``OBJECTIVES``, ``register_objective``), so methods that
train against a teacher can reuse this loop.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qft.nn import distributed
from qft.files.atomic import atomic_dir
from qft.files.data import completion_blocks, load_texts, token_blocks
from qft.training.evaluate import perplexity

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PRECISIONS = ("fp32", "bf16")

Objective = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    """Decorator: make ``objective(model, input_ids) -> scalar loss`` available to ``train(objective=name)``."""
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")

    def register(objective: Objective) -> Objective:
        OBJECTIVES[name] = objective
        return objective

    return register


@register_objective("ce")
def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Next-token cross-entropy of the model on its own input (on ``labels``' tokens only: -100 skips one)."""
    return model(input_ids=input_ids, labels=input_ids if labels is None else labels).loss


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    block_size: int = 256
    lr: float = 2e-4
    warmup: int = 10  # steps of linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    eval_every: int = 0  # 0: evaluate only before and after
    eval_blocks: int | None = None  # held-out blocks per evaluation (None: all, 0: no evaluation)
    save_every: int = 0  # 0: no checkpoints during training
    keep: int = 2  # checkpoints kept on disk
    seed: int = 0
    precision: str = "fp32"  # "bf16": forwards under bf16 autocast, fp32 master weights and AdamW state

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {list(PRECISIONS)}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float  # wall time of the steps run in this call (evaluation excluded)
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)  # mean loss per step, whole run
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out perplexity)
    steps_run: int = 0  # steps run in this call (fewer than steps after a resume)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps_run)


def _batch_indices(n_blocks: int, config: TrainConfig, step: int, micro: int) -> torch.Tensor:
    """Blocks of one micro-batch: a fresh permutation per epoch, seeded by (seed, epoch)."""
    first = (step * config.grad_accum + micro) * config.batch_size
    picks = []
    for i in range(first, first + config.batch_size):
        epoch, pos = divmod(i, n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        picks.append(int(perm[pos]))
    return torch.tensor(picks)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameter that requires grad; call qft.quantize_and_prepare(model) first")
    return params


def _resolve_objective(objective: str | Objective) -> tuple[Objective, str]:
    """The loss function and the name recorded in trainer_state.json."""
    if callable(objective):
        return objective, getattr(objective, "__qualname__", type(objective).__qualname__)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective], objective


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of every forward: bf16 autocast, or none at all for fp32 (today's behaviour)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fp32_masters(params: dict[str, torch.nn.Parameter]) -> None:
    """Make the trainable parameters fp32 in place: bf16 updates of lr * step would mostly round away."""
    converted = [p for p in params.values() if p.dtype != torch.float32]
    for p in converted:
        p.data = p.data.float()
    if converted:
        logger.info("bf16 training: %d trainable parameters converted to float32 master copies", len(converted))


def _checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """Gradient checkpointing on or off, on the transformers model itself: a DDP wrapper (qft.replicate)
    has no such method. transformers 5 renamed the methods; older releases have only the old names."""
    model = distributed.unwrap(model)
    renamed = hasattr(model, "activation_checkpointing_enable")
    if enable and renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif renamed:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders do not match)."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir`` (None if there is none)."""
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def _save_checkpoint(output_dir: Path, step: int, params, optimizer, config, result: TrainResult,
                     objective: str) -> Path:
    names = {id(p): n for n, p in params.items()}
    moments = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{names[id(p)]}.{key}"] = value.detach().reshape(-1) if value.dim() == 0 else value.detach()
    moments["__rng__"] = torch.get_rng_state()
    device = next(iter(params.values())).device
    if device.type == "cuda":
        moments["__cuda_rng__"] = torch.cuda.get_rng_state(device)
    target = output_dir / f"checkpoint-{step}"
    with atomic_dir(target) as tmp:
        save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
        state = {"version": CHECKPOINT_VERSION, "step": step, "config": asdict(config), "objective": objective,
                 "losses": result.losses, "evals": result.evals, "tokens": result.tokens}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    old = _checkpoints(output_dir)
    for path in old[: max(0, len(old) - config.keep)]:
        shutil.rmtree(path)
    return target


def _load_checkpoint(path: Path, params, optimizer, config: TrainConfig, result: TrainResult, objective: str) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a version {state.get('version')} checkpoint; this qft reads version {CHECKPOINT_VERSION}")
    saved = {k: v for k, v in state["config"].items() if k not in ("eval_every", "eval_blocks", "save_every", "keep")}
    now = {k: v for k, v in asdict(config).items() if k in saved}
    if saved != now:
        diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now[k]}
        raise ValueError(f"{path} was written with other settings (saved, now): {diff}; resume with the same ones")
    if state.get("objective", objective) != objective:
        logger.warning("%s was trained with objective %s; continuing with %s", path, state["objective"], objective)
    weights = load_file(str(path / "trainable.safetensors"))
    if weights.keys() != params.keys():
        raise ValueError(f"{path} holds other trainable parameters than this model "
                         f"(missing {sorted(params.keys() - weights.keys())[:3]}, extra {sorted(weights.keys() - params.keys())[:3]})")
    for n, p in params.items():  # every check before the first copy: never a half-restored model
        if weights[n].shape != p.shape:
            raise ValueError(f"{path}: {n} has shape {tuple(weights[n].shape)}, the model's {tuple(p.shape)}")
    moments = load_file(str(path / "optimizer.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    torch.set_rng_state(moments.pop("__rng__"))
    cuda_rng = moments.pop("__cuda_rng__", None)
    device = next(iter(params.values())).device
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng, device)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, _, field_name = key.rpartition(".")
        # step stays a CPU scalar, as AdamW keeps it; the moments go where their parameter is
        entries.setdefault(name, {})[field_name] = value if field_name == "step" else value.to(params[name].device)
    for n, entry in entries.items():
        entry["step"] = entry["step"].reshape(())
        optimizer.state[params[n]] = entry
    result.losses, result.tokens = state["losses"], state["tokens"]
    result.evals = [tuple(e) for e in state["evals"]]
    return state["step"]


def train(
    model: torch.nn.Module,
    tokenizer,
    data=None,
    eval_data=None,
    *,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    progress: bool = True,
    objective: str | Objective = "ce",
    teacher: torch.nn.Module | None = None,
    **overrides,
) -> TrainResult:
    """Fine-tune the parameters of ``model`` that require grad (after ``quantize_and_prepare``: the
    low-rank factors) with ``objective`` (default: the causal-LM loss).

    data / eval_data: a list of texts, a list of (prompt, completion) pairs (the loss then covers the
      completions only: a task's answers; ``qft.files.data.completion_blocks``), a LongTensor of token
      blocks, or anything ``qft.files.data.load_texts`` reads (None: the embedded corpus); a source's
      "train" split trains and, unless ``eval_data`` is given, its "test" split evaluates (the held-out
      perplexity counts every token, of pairs too).
    config: a TrainConfig; keyword ``overrides`` (steps=, lr=, ...) change single fields.
    output_dir: where checkpoints go (every ``save_every`` steps, and at the end).
    resume: True to continue from the latest checkpoint in ``output_dir`` (or a path to one).
    objective: a name in ``OBJECTIVES`` ("ce": causal-LM loss; "lrec": distillation from ``teacher``,
      ``qft.methods.lrec``) or ``objective(model, input_ids)`` returning a scalar loss.
    teacher: the model a distillation objective learns from (``objective(model, input_ids, teacher=...)``);
      it is only run, never trained, and may sit on another device or in another dtype.
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    loss_fn, objective_name = _resolve_objective(objective)
    if teacher is not None:
        if "teacher" not in inspect.signature(loss_fn).parameters:
            raise ValueError(f"objective {objective_name!r} does not learn from a teacher; "
                             "use objective='lrec' with teacher=, or leave teacher out")
        if teacher is model:
            raise ValueError("the teacher must be a separate full-precision model, not the model being trained")
        loss_fn = functools.partial(loss_fn, teacher=teacher)
    if config.steps < 1 or config.batch_size < 1 or config.grad_accum < 1:
        raise ValueError("steps, batch_size and grad_accum must be >= 1")
    if (config.save_every or resume) and output_dir is None:
        raise ValueError("checkpoints need output_dir=")
    rank, world = distributed.world()
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is the global batch and must divide by the world size {world}")
    if world > 1 and not (distributed.is_sharded(model) or distributed.is_replicated(model)):
        raise ValueError(f"this is one of {world} processes, but the model is neither sharded nor replicated: "
                         "wrap it with qft.shard(model) (FSDP2) or qft.replicate(model) (DDP) before training")
    if world > 1 and output_dir is not None:
        raise ValueError("training checkpoints (output_dir=) are single-process only; after a distributed run, "
                         "write the model with qft.save_quantized(model, directory), which gathers it")
    blocks, labels = _blocks(data, "train", tokenizer, config.block_size)
    if labels is not None and not _takes_labels(loss_fn):
        raise ValueError(f"objective {objective_name!r} learns from whole texts and takes no labels; train "
                         "(prompt, completion) pairs with objective='ce', or pass the joined texts")
    if eval_data is None and not isinstance(data, (list, torch.Tensor)):
        eval_data = data  # its own held-out split
    eval_blocks = None
    if config.eval_blocks != 0:
        eval_blocks = _blocks(eval_data, "test", tokenizer, config.block_size)[0][: config.eval_blocks]
    params = _trainable(model)
    device = next(iter(params.values())).device
    if config.precision == "bf16":
        _fp32_masters(params)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay, foreach=False)
    result = TrainResult(0, 0, 0.0, sum(p.numel() for p in params.values()))

    torch.manual_seed(config.seed)
    start_step = 0
    if resume:
        path = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(output_dir)
        if path is None:
            logger.info("no checkpoint in %s; starting from step 0", output_dir)
        else:
            start_step = _load_checkpoint(path, params, optimizer, config, result, objective_name)
            logger.info("resumed from %s at step %d", path, start_step)

    if config.gradient_checkpointing:
        _checkpointing(model, True)
    was_training = model.training

    def evaluate(step: int) -> None:
        if eval_blocks is None:
            return
        with _autocast(config.precision, device):
            ppl = perplexity(model, tokenizer, eval_blocks, block_size=config.block_size,
                             batch_size=config.batch_size, progress=False)
        result.evals.append((step, ppl))
        logger.info("step %d: held-out perplexity %.3f", step, ppl)

    if start_step == 0 and not result.evals:
        evaluate(0)
    model.train()
    bar = tqdm(range(start_step, config.steps), disable=not progress, desc="train", unit="step",
               initial=start_step, total=config.steps)
    try:
        for step in bar:
            t0 = time.perf_counter()
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(config.grad_accum):
                # the global micro-batch; under torchrun each rank takes its share
                batch = _batch_indices(len(blocks), config, step, micro)
                ids = blocks[batch].tensor_split(world)[rank].to(device)
                with _autocast(config.precision, device):
                    if labels is None:
                        loss = loss_fn(model, ids)
                    else:
                        loss = loss_fn(model, ids, labels=labels[batch].tensor_split(world)[rank].to(device))
                (loss / config.grad_accum).backward()
                total += float(loss.detach()) / config.grad_accum
                result.tokens += ids.numel() * world
            if world > 1:  # the mean over the global batch (gradients are averaged by FSDP/DDP)
                total = distributed.mean_over_ranks(total, device)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.seconds += time.perf_counter() - t0
            result.steps_run += 1
            result.losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                evaluate(done)
                model.train()
            if output_dir is not None and (done == config.steps or (config.save_every and done % config.save_every == 0)):
                _save_checkpoint(Path(output_dir), done, params, optimizer, config, result, objective_name)
    finally:
        bar.close()
        model.train(was_training)
        if config.gradient_checkpointing:
            _checkpointing(model, False)
    if not result.evals or result.evals[-1][0] != config.steps:
        evaluate(config.steps)
    result.steps = config.steps
    return result


def _takes_labels(objective: Objective) -> bool:
    parameters = inspect.signature(objective).parameters.values()
    return any(p.name == "labels" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _blocks(data, split: str, tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token blocks of ``data`` and, for (prompt, completion) pairs, their labels (else None)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long:
            raise ValueError(f"token blocks must be a 2-D LongTensor, got {data.dtype} {tuple(data.shape)}")
        return data, None
    if isinstance(data, list) and any(isinstance(item, tuple) for item in data):
        if not all(isinstance(item, tuple) and len(item) == 2 for item in data):
            raise ValueError("data mixes texts and tuples: give either texts or (prompt, completion) pairs")
        return completion_blocks(tokenizer, data, block_size)
    texts = data if isinstance(data, list) else load_texts(data, split, tokenizer=tokenizer)
    return token_blocks(tokenizer, texts, block_size), None
