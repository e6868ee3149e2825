"""kbitprep against peft 0.21.2's ``prepare_model_for_kbit_training``, side by side in one run.

Usage: ``python benchmarks/run.py [--repeats N] [--steps N] [--quick]`` (``nox -s bench`` runs it
with the defaults). It prints a table of ratios (kbitprep / peft) and writes
``benchmarks/results.json`` (one object per metric), ``benchmarks/results.png`` and
``benchmarks/run-info.json`` (settings, per-step losses and times).

Every timing is a median over repeated runs, the two libraries interleaved run by run so that
load from other processes on a shared machine falls on both alike:

- import time: ``import kbitprep`` against ``import torch`` and against ``import peft``, each in a
  fresh interpreter;
- prepare wall time and parameter bytes after prepare on a 134.5 M-parameter Llama with
  SmolLM2-135M's shape in bf16, flagged 4-bit by hand (``is_loaded_in_4bit = True``), and on the
  real SmolLM2-135M-Instruct quantized nf4 by bitsandbytes (the ``kbitprep demo`` model);
- upcast bytes with ``keep_in_low_precision=("lm_head", "embed_tokens")`` against peft's, and
  the held-out loss after 30 LoRA steps (4 × 128 tokens, the demo's corpus and settings) in
  both settings;
- one LoRA training step's time after each library's prepare (median over the 30 steps less
  the first, the three runs stepped in turn);
- peak RSS during prepare minus RSS after prepare (sampled every 0.5 ms by a thread).

Runtime on 2 CPU cores: the import, prepare and memory parts take about 5 minutes; the training
part is 3 runs × ``--steps`` steps and dominates. On an AVX2-only CPU (fp32 compute) a 4 × 128
step takes 15-50 s per run depending on other load, so the defaults (30 steps) take 25-75
minutes; ``--steps 10 --batch-size 2`` about 15 minutes; ``--quick`` about 10.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEEP = ("lm_head", "embed_tokens")


@dataclass
class Row:
    name: str
    kbitprep: float
    peft: float
    unit: str
    target: str = ""  # "<= 1.05", "within 1%" or ""
    baseline: str = "peft 0.21.2"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.kbitprep / self.peft if self.peft else None

    def verdict(self) -> tuple[bool | None, str]:
        r = self.ratio
        if not self.target or r is None:
            return None, ""
        if self.target.startswith("<="):
            limit = float(self.target[2:])
            ok = r <= limit
            return ok, "" if ok else f"missed by {r / limit - 1:.1%} ({r:.3f}x vs {limit}x)"
        if self.target.startswith("within"):
            limit = float(self.target.split()[1].rstrip("%")) / 100
            ok = abs(r - 1) <= limit
            return ok, "" if ok else f"missed: off by {abs(r - 1):.2%} (limit {limit:.0%})"
        return None, ""

    def to_dict(self) -> dict[str, Any]:
        ok, how = self.verdict()
        return {
            "name": self.name,
            "kbitprep": self.kbitprep,
            "peft": self.peft,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "unit": self.unit,
            "baseline": self.baseline,
            "target": self.target or None,
            "met": ok,
            "note": how or self.note or None,
        }


# -- helpers ------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "KBITPREP_DISABLE_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def param_bytes(model: Any) -> int:
    from kbitprep.backends.base import tensor_nbytes

    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_nbytes(p)
    return total


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Samples this process's RSS every 0.5 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.0005)

    def __enter__(self) -> PeakRSS:
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def peft_prepare(model: Any) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model)


def kbit_prepare(model: Any, keep: tuple[str, ...] = ()) -> Any:
    from kbitprep import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, keep_in_low_precision=keep)


PREPARERS: dict[str, Callable[[Any], Any]] = {
    "kbitprep": kbit_prepare,
    "peft": peft_prepare,
    "keep": lambda m: kbit_prepare(m, KEEP),
}


def measure_prepare(source: Any, repeats: int, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Prepare fresh copies of ``source``, libraries interleaved; wall times, bytes, RSS peaks."""
    out: dict[str, dict[str, Any]] = {n: {"seconds": [], "rss": []} for n in names}
    out["before"] = {"bytes": param_bytes(source)}
    for i in range(repeats):
        for name in names if i % 2 == 0 else tuple(reversed(names)):
            model = copy.deepcopy(source)
            gc.collect()
            t = time.perf_counter()
            PREPARERS[name](model)
            out[name]["seconds"].append(time.perf_counter() - t)
            out[name]["bytes"] = param_bytes(model)
            del model
            gc.collect()
            # the same again with the RSS sampler on (kept out of the timed run)
            model = copy.deepcopy(source)
            gc.collect()
            with PeakRSS() as peak:
                PREPARERS[name](model)
            out[name]["rss"].append(max(0, peak.peak - rss()))
            del model
            gc.collect()
    return out


# -- the models ---------------------------------------------------------------------------------


def smollm2_shaped_bf16() -> Any:
    """134.5 M parameters with SmolLM2-135M's shape, random init, bf16, flagged 4-bit by hand."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134_515_008) < 1_000, n
    return model


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it).

    Without it (e.g. an AVX2-only CPU) torch falls back to a scalar bf16 dot product for bf16
    matmuls, tens of times slower than fp32.
    """
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_nf4(compute_dtype: Any) -> Any:
    """SmolLM2-135M-Instruct (the demo's bf16 copy) quantized nf4 with double quantization by
    bitsandbytes on CPU; float parameters stay bf16, matmuls run in ``compute_dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kbitprep import demo

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        demo.default_model_dir(print), dtype=torch.bfloat16, device_map="cpu", quantization_config=config
    )


# -- training -----------------------------------------------------------------------------------


def train_side_by_side(source: Any, steps: int, seq_len: int, batch_size: int) -> dict[str, dict[str, Any]]:
    """Prepare three copies (peft, kbitprep defaults, kbitprep keeping lm_head/embed_tokens in
    bf16), attach the same LoRA, train them on the same batches one step each in turn."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kbitprep import demo

    tokenizer = demo.load_tokenizer(demo.default_model_dir())
    train_text, held_text = demo.corpus()
    train_ids = demo.tokenize(tokenizer, train_text)
    held = demo.held_out_blocks(demo.tokenize(tokenizer, held_text), seq_len)
    generator = torch.Generator().manual_seed(0)
    batches = [demo.train_windows(train_ids, seq_len, batch_size, generator) for _ in range(steps)]

    runs: dict[str, dict[str, Any]] = {}
    for name in ("peft", "kbitprep", "keep"):
        model = copy.deepcopy(source)
        PREPARERS[name](model)
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        runs[name] = {"model": model, "opt": opt, "step_seconds": [], "losses": []}
    for step, batch in enumerate(batches):
        order = list(runs) if step % 2 == 0 else list(reversed(runs))
        for name in order:
            run = runs[name]
            t = time.perf_counter()
            loss = run["model"](input_ids=batch, labels=batch).loss
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["step_seconds"].append(time.perf_counter() - t)
            run["losses"].append(float(loss))
        print(f"  step {step + 1}/{steps}: " + ", ".join(f"{n} {runs[n]['losses'][-1]:.3f}" for n in runs), flush=True)
    for run in runs.values():
        run["held_out"] = demo.mean_loss(run["model"], held, batch_size)
        del run["model"], run["opt"]
    return runs


# -- output -------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1e6:,.2f} MB"
    if unit == "s":
        return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
    return f"{value:.4f}"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("metric", "left"), ("kbitprep", "right"), ("baseline", "right"), ("ratio", "right"), ("target", "right"), ("result", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ok, how = row.verdict()
        base = fmt(row.peft, row.unit) + ("" if row.baseline == "peft 0.21.2" else f" ({row.baseline})")
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}x"
        result = "met" if ok else (how if ok is False else (row.note or ""))
        table.add_row(row.name, fmt(row.kbitprep, row.unit), base, ratio, row.target or "-", result)
    Console(width=160).print(table)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.6))
    names = [r.name for r in shown][::-1]
    ratios = [r.ratio or 0.0 for r in shown][::-1]
    colors = []
    for r in shown[::-1]:
        ok, _ = r.verdict()
        colors.append("#2e7d32" if ok else ("#c62828" if ok is False else "#607d8b"))
    ax.barh(names, ratios, color=colors)
    for y, r in enumerate(shown[::-1]):
        if r.target.startswith("<="):
            limit = float(r.target[2:])
            ax.plot([limit, limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text((r.ratio or 0) * 1.05, y, f"{r.ratio:.3f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("kbitprep / baseline (log scale; lower is better for time and bytes; black tick = target)")
    fig.suptitle("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing (median); default 5")
    parser.add_argument("--import-repeats", type=int, default=5, help="fresh interpreters per import timing; default 5")
    parser.add_argument("--steps", type=int, default=30, help="LoRA steps per library; default 30")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--compute-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="bitsandbytes compute dtype of the nf4 model; auto: bfloat16 where the CPU multiplies bf16 "
        "natively (AVX512-BF16/AMX), else float32 (bitsandbytes' own default)",
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats, 10 steps: a smoke run, not for results")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and results.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.import_repeats, args.steps = 3, 3, 10
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    started = time.perf_counter()

    import torch

    torch.manual_seed(0)
    import peft

    import kbitprep

    print(f"kbitprep {kbitprep.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads", flush=True)
    rows: list[Row] = []

    print("import time ...", flush=True)
    times: dict[str, list[float]] = {"torch": [], "kbitprep": [], "peft": []}
    for i in range(args.import_repeats):
        for mod in (("torch", "kbitprep", "peft") if i % 2 == 0 else ("peft", "kbitprep", "torch")):
            times[mod].append(import_seconds(mod))
    t_torch, t_kbit, t_peft = (median(times[m]) for m in ("torch", "kbitprep", "peft"))
    rows.append(Row("import time vs import torch", t_kbit, t_torch, "s", "<= 1.05", baseline="import torch"))
    rows.append(Row("import time vs import peft", t_kbit, t_peft, "s", baseline="import peft"))

    print("134.5M bf16 model flagged 4-bit: prepare ...", flush=True)
    synth = smollm2_shaped_bf16()
    res = measure_prepare(synth, args.repeats, ("kbitprep", "peft"))
    del synth
    gc.collect()
    rows.append(Row("prepare time, 134.5M bf16 flagged 4-bit", median(res["kbitprep"]["seconds"]), median(res["peft"]["seconds"]), "s", "<= 1.0"))
    rows.append(Row("param bytes after prepare, 134.5M bf16", res["kbitprep"]["bytes"], res["peft"]["bytes"], "bytes", note="same policy as peft"))
    rows.append(Row("peak RSS in prepare - after, 134.5M bf16", median(res["kbitprep"]["rss"]), median(res["peft"]["rss"]), "bytes"))

    compute = args.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if cpu_has_fast_bf16() else "float32"
    print(f"SmolLM2-135M-Instruct nf4 (compute dtype {compute}): load ...", flush=True)
    nf4 = load_nf4(getattr(torch, compute))
    print("SmolLM2-135M-Instruct nf4: prepare ...", flush=True)
    res = measure_prepare(nf4, args.repeats, ("kbitprep", "peft", "keep"))
    before = res["before"]["bytes"]
    rows.append(Row("prepare time, SmolLM2 nf4", median(res["kbitprep"]["seconds"]), median(res["peft"]["seconds"]), "s", "<= 1.0"))
    rows.append(Row("param bytes after prepare, SmolLM2 nf4", res["kbitprep"]["bytes"], res["peft"]["bytes"], "bytes", note="same policy as peft"))
    rows.append(Row(
        "upcast bytes, keep lm_head+embed vs peft",
        res["keep"]["bytes"] - before,
        res["peft"]["bytes"] - before,
        "bytes",
        "<= 0.05",
    ))
    rows.append(Row("peak RSS in prepare - after, SmolLM2 nf4", median(res["kbitprep"]["rss"]), median(res["peft"]["rss"]), "bytes"))

    print(f"LoRA training, {args.steps} steps of {args.batch_size}x{args.seq_len} tokens, three runs in turn ...", flush=True)
    runs = train_side_by_side(nf4, args.steps, args.seq_len, args.batch_size)
    step = {n: median(r["step_seconds"][1:] or r["step_seconds"]) for n, r in runs.items()}
    rows.append(Row(f"held-out loss after {args.steps} steps, keep vs peft", runs["keep"]["held_out"], runs["peft"]["held_out"], "loss", "within 1%"))
    rows.append(Row(f"held-out loss after {args.steps} steps, defaults", runs["kbitprep"]["held_out"], runs["peft"]["held_out"], "loss", "within 1%"))
    rows.append(Row("LoRA step time, defaults", step["kbitprep"], step["peft"], "s", "<= 1.0"))
    rows.append(Row("LoRA step time, keep lm_head+embed", step["keep"], step["peft"], "s", "<= 0.95"))

    minutes = (time.perf_counter() - started) / 60
    title = (
        f"kbitprep {kbitprep.__version__} vs peft {peft.__version__} (torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores; medians of {args.repeats} runs; {args.steps} LoRA steps, nf4 compute {compute})"
    )
    print_table(rows, title)
    missed = [(r.name, r.verdict()[1]) for r in rows if r.verdict()[0] is False]
    for name, how in missed:
        print(f"target missed: {name}: {how}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    info = {
        "title": title,
        "minutes": round(minutes, 1),
        "settings": {
            "repeats": args.repeats,
            "import_repeats": args.import_repeats,
            "steps": args.steps,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "keep_in_low_precision": list(KEEP),
            "lora": "r=8, alpha=16, all-linear, lr 2e-3 AdamW",
            "nf4_compute_dtype": compute,
            "cpu_bf16_native": cpu_has_fast_bf16(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "train_losses": {n: [round(x, 4) for x in r["losses"]] for n, r in runs.items()},
        "step_seconds": {n: [round(x, 4) for x in r["step_seconds"]] for n, r in runs.items()},
    }
    (args.out / "run-info.json").write_text(json.dumps(info, indent=2) + "\n")
    plot(rows, args.out / "results.png", title)
    print(f"wrote results.json, results.png and run-info.json to {args.out} in {minutes:.1f} min")
    assert all(math.isfinite(r.kbitprep) and math.isfinite(r.peft) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
