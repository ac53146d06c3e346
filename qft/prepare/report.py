"""Tables of quantization error and true storage cost over many matrices."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from qft.methods import weighted_error
from qft.quant.formats import Format, get_format
from qft.quant.tensor import QuantizedTensor


def quantization_error_table(
    weights: dict[str, torch.Tensor], formats: list[str | Format], progress: bool = True
) -> list[dict]:
    """Quantize every weight in every format; one row per format.

    rel_error: ||W - Q||_F / ||W||_F over all matrices together;
    mean_matrix_error: the same ratio per matrix, averaged;
    bits_per_param: real bytes of codes and scales * 8 / parameters.
    """
    rows = []
    numel = sum(w.numel() for w in weights.values())
    norm2 = sum(float(w.float().pow(2).sum()) for w in weights.values())
    bar = tqdm(total=len(formats) * len(weights), disable=not progress, desc="quantize", unit="matrix")
    for spec in formats:
        fmt = get_format(spec)
        err2, nbytes, per_matrix = 0.0, 0, []
        for w in weights.values():
            qt = QuantizedTensor.quantize(w, fmt)
            e2 = weighted_error(w, qt.dequantize(), None)
            err2 += e2
            nbytes += qt.nbytes
            per_matrix.append(math.sqrt(e2 / max(float(w.float().pow(2).sum()), 1e-30)))
            bar.update()
        rows.append({
            "format": fmt.name,
            "rel_error": math.sqrt(err2 / max(norm2, 1e-30)),
            "mean_matrix_error": sum(per_matrix) / len(per_matrix),
            "bits_per_param": 8 * nbytes / numel,
        })
    bar.close()
    return rows


def markdown_table(rows: list[dict], floatfmt: str = ".4f") -> str:
    """Render rows as a Markdown table: the columns are every row's keys, in order; a missing cell is empty."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
