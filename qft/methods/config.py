"""One frozen config object per method: what ``qft.quantize_(model, config)`` applies.

A config checks itself when it is built, so a bad option fails before any weight is touched,
and says exactly how a model was made: ``to_dict()`` is written into the checkpoint and into
``model.config.quantization_config``; ``QuantConfig.from_dict`` reads it back.

Two shapes: :class:`BudgetConfig` for the methods that quantize matrix by matrix under a bit
budget or one format (LQ-LoRA, LoftQ, QLoRA, QA-LoRA, PEQA, INT2.1, and any method registered with
``register_method``), :class:`WholeModelConfig` for those that build every layer themselves
(HALO, and any ``register_prepare_method``). Which handler applies each shape is registered in
``qft.prepare.quantize``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from qft.methods import ROUNDINGS, get_method
from qft.nn import HaloSettings
from qft.quant.formats import Format, get_format
from qft.quant.formats.base import check_choice
from qft.solvers.mckp import SOLVERS

def parse_bits(text: str) -> float | int | str:
    """Command-line ``--bits``: "4" stays an int (PEQA reads it as a width), "2.5" is a budget,
    anything else a format name ("nf4", "int3-g64")."""
    if text.isdigit():
        return int(text)
    if text.replace(".", "", 1).isdigit():
        return float(text)
    return text


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What every method shares. rank: of the low-rank adapters (None: the method's default);
    alpha: their scaling is alpha / rank; target_modules / skip_modules: which Linear (or Conv1D)
    layers to quantize, by name or name suffix (the output head is skipped unless skip_modules says
    otherwise); seed: of every random draw."""

    quant_method: ClassVar[str] = "qft"  # transformers' name for qft: from_pretrained(quantization_config=config)

    method: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    skip_modules: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        spec = get_method(self.method)  # an unknown method fails here
        for name in ("target_modules", "skip_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} is a list of module names, got the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (the adapters' scaling is alpha / rank), got {self.alpha}")
        if spec.needs_rank and self.rank == 0:
            raise ValueError(f"method {self.method!r} needs rank >= 1 "
                             "(use method='qlora' with rank=0 for plain quantization)")

    @property
    def resolved_rank(self) -> int:
        return get_method(self.method).default_rank if self.rank is None else self.rank

    def to_dict(self) -> dict:
        """Plain JSON values: format objects by name, tuples as lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.name if isinstance(v, Format) else v for v in value]
            out[f.name] = value
        return out

    @staticmethod
    def from_dict(data: dict) -> QuantConfig:
        """The config ``to_dict`` wrote (e.g. ``config.json``'s ``quantization_config["config"]``)."""
        data = dict(data)
        method = data.get("method")
        cls = CONFIGS.get(method) or (WholeModelConfig if get_method(method).prepare else BudgetConfig)
        own = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - own - {"method"})
        if unknown:
            raise ValueError(f"{cls.__name__} has no option(s) {unknown}; it takes {sorted(own)}")
        if "method" not in own:
            data.pop("method")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class BudgetConfig(QuantConfig):
    """A method that quantizes matrix by matrix. bits: an average budget in bits per parameter
    (the ILP picks one format per matrix), a format name used everywhere ("nf4",
    "nf3-b64-dq8b256", "int4-g128"), or for PEQA an int width (4: int4 per channel); fisher:
    weight the errors by the empirical Fisher over calibration text; rounding: "rtn" or "gptq"
    (None: the method's); formats: the candidates a budget chooses from (None: the method's grid);
    iters: LQ-LoRA's alternations; solver: the ILP's solver."""

    bits: float | int | str = 2.5
    fisher: bool = False
    rounding: str | None = None
    formats: tuple[str | Format, ...] | None = None
    iters: int = 10
    solver: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = get_method(self.method)
        if spec.prepare is not None:
            raise ValueError(f"method {self.method!r} builds whole layers without a bit budget: "
                             "use WholeModelConfig (or its own config class)")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (str, int, float)):
            raise ValueError(f"bits must be a number (average budget) or a format name, got {self.bits!r}")
        if isinstance(self.bits, str):
            get_format(self.bits)  # a bad name fails here
        elif not (isinstance(self.bits, int) and spec.width_format is not None) and not self.bits > 0:
            raise ValueError(f"a bit budget must be > 0 bits per parameter, got {self.bits}")
        if self.rounding is not None:
            check_choice("rounding", self.rounding, ROUNDINGS)
        check_choice("solver", self.solver, SOLVERS)
        if self.formats is not None:
            formats = tuple(self.formats)
            for f in formats:
                if not isinstance(f, Format):
                    get_format(f)
            object.__setattr__(self, "formats", formats)
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")

    @property
    def resolved_rounding(self) -> str:
        return self.rounding or get_method(self.method).rounding

    @property
    def fixed_format(self) -> str | None:
        """The one format every matrix gets, or None for a budget the ILP spends."""
        spec = get_method(self.method)
        if isinstance(self.bits, int) and spec.width_format is not None:
            return spec.width_format(self.bits)
        return self.bits if isinstance(self.bits, str) else None


@dataclass(frozen=True, kw_only=True)
class WholeModelConfig(QuantConfig):
    """A method that builds every layer itself (``register_prepare_method``); options: its own."""

    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = get_method(self.method)
        if spec.prepare is None:
            raise ValueError(f"method {self.method!r} quantizes matrix by matrix: use BudgetConfig "
                             "(or its own config class)")
        unknown = sorted(set(self.options) - set(spec.options))
        if unknown:
            raise ValueError(f"unexpected option(s) {unknown}; method {self.method!r} takes "
                             + (f"{list(spec.options)}" if spec.options else "none beyond the common arguments"))


@dataclass(frozen=True, kw_only=True)
class LQLoRAConfig(BudgetConfig):
    """LQ-LoRA: W ≈ Q + L1·L2, Q = quantize(W − L1L2) and L1L2 = SVD_r(W − Q) alternated; the ILP
    spends ``bits`` over NF-k formats (``fisher=True``: Fisher-weighted)."""

    method: str = field(default="lqlora", init=False)


@dataclass(frozen=True, kw_only=True)
class LoftQConfig(BudgetConfig):
    """LoftQ as PEFT runs it (one step): Q = quantize(W), L1L2 = SVD_r(W − Q)."""

    method: str = field(default="loftq", init=False)
    bits: float | int | str = "nf4"


@dataclass(frozen=True, kw_only=True)
class QLoRAConfig(BudgetConfig):
    """QLoRA: plain quantization (NF4 by default) and LoRA initialised as PEFT does (B = 0)."""

    method: str = field(default="qlora", init=False)
    bits: float | int | str = "nf4"


@dataclass(frozen=True, kw_only=True)
class QALoRAConfig(BudgetConfig):
    """QA-LoRA: plain quantization (Q4_1 by default) and LoRA on inputs averaged over each of the format's
    blocks (B = 0), which ``qft.methods.qalora.merge_qalora`` folds exactly into the blocks' offsets."""

    method: str = field(default="qalora", init=False)
    bits: float | int | str = "q4_1"


@dataclass(frozen=True, kw_only=True)
class PEQAConfig(BudgetConfig):
    """PEQA: int-k round-to-nearest, only the scales train; ``bits=4`` is int4 per channel."""

    method: str = field(default="peqa", init=False)
    bits: float | int | str = 4


@dataclass(frozen=True, kw_only=True)
class INT21Config(BudgetConfig):
    """INT2.1: GPTQ int2 + LoRA (rank 32), to train with the LREC objective."""

    method: str = field(default="int21", init=False)
    bits: float | int | str = "int2-g128"


@dataclass(frozen=True, kw_only=True)
class HALOConfig(WholeModelConfig):
    """HALO: FP8/INT8 training matmuls behind Hadamard rotations. level 0/1/2 (rotations);
    precision "fp8" or "int8"; granularity "tensor" or "row" (one scale per tensor or row);
    grad_format "e4m3" or "e5m2"; peft: a frozen 8-bit base + LoRA of ``rank`` (default 16)
    instead of full fine-tuning."""

    method: str = field(default="halo", init=False)
    options: dict = field(default_factory=dict, init=False)
    level: int = 2
    precision: str = "fp8"
    granularity: str = "tensor"
    grad_format: str = "e4m3"
    peft: bool = False

    def __post_init__(self) -> None:
        HaloSettings(self.level, self.precision, self.granularity, self.grad_format)  # checks each choice
        if not self.peft and self.rank:
            raise ValueError(f"full HALO fine-tuning trains the weights themselves; rank={self.rank} "
                             "applies with peft=True")
        object.__setattr__(self, "options", {"level": self.level, "precision": self.precision,
                                             "granularity": self.granularity, "grad_format": self.grad_format,
                                             "peft": self.peft})
        super().__post_init__()

    def to_dict(self) -> dict:
        out = super().to_dict()
        del out["options"]  # the typed fields say it
        return out


CONFIGS: dict[str, type[QuantConfig]] = {
    c.__dataclass_fields__["method"].default: c
    for c in (LQLoRAConfig, LoftQConfig, QLoRAConfig, QALoRAConfig, PEQAConfig, INT21Config, HALOConfig)
}


def config_for(method: str, **options) -> QuantConfig:
    """The config of ``method`` from keyword options (the keyword form of ``quantize_and_prepare``
    and the command line): its own class, else the generic one for its shape."""
    spec = get_method(method)
    cls = CONFIGS.get(method)
    if cls is None:
        cls = WholeModelConfig if spec.prepare else BudgetConfig
        options = {"method": method, **options}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unexpected option(s) {unknown} for method {method!r}; its config "
                         f"({cls.__name__}) takes {sorted(names - {'method'})}")
    return cls(**options)
