"""kbitprep against peft 0.21.2's ``prepare_model_for_kbit_training``, side by side in one process.

Usage: ``python benchmarks/run.py [--steps N] [--ckpt-steps N] [--only PART ...] [--out DIR] [--merge]``
(``nox -s bench`` runs it with the defaults). It prints a table (kbitprep / baseline ratios, each
target met or missed) and writes ``benchmarks/results.json`` (one object per metric, tagged with
its part), ``benchmarks/results.png`` and ``benchmarks/run-info.json`` (settings, every step's
loss, time and RSS, each tracked step's live tensor peak, the plans' decisions).

Parts (``--only`` picks some; a partial run writes its files only when ``--out`` is given, and
with ``--merge`` its rows replace the same parts' rows of the results.json already in ``--out``,
default ``benchmarks/``, the other rows kept in place):

- ``import``: ``import kbitprep`` against ``import torch`` and ``import peft``, each in a fresh
  interpreter, interleaved, median of ``--import-repeats``;
- ``prepare``: prepare wall time, parameter bytes after prepare and peak RSS during prepare on a
  134.5 M-parameter Llama with SmolLM2-135M's shape in bf16 flagged 4-bit by hand, and on the real
  SmolLM2-135M-Instruct quantized nf4 by bitsandbytes; median of ``--repeats``, interleaved;
- ``training`` (the speed and memory targets): SmolLM2 nf4, fp32 compute, LoRA r=8 on q_proj/v_proj,
  batch ``--batch-size`` x ``--seq-len`` (4 x 128). Five models in one process (peft, kbitprep
  defaults, kbitprep with ``keep_in_low_precision=("lm_head", "embed_tokens")``, kbitprep with
  ``upcast="none"``, and, as a diagnostic, the keep setting with peft's ``use_reentrant=True``)
  train on the same batches, one step each in turn, the order rotated every round. Step 1 (same
  batch, same LoRA initialisation: torch seeded before each ``get_peft_model``) is the warm-up and
  gives the losses compared bit for bit; the next ``--steps`` steps are timed. Step-time ratio =
  median over rounds of (variant's step / peft's step in the same round), so that load from
  other processes falls on both alike. Then one more round, untimed, runs each model's step
  under the live-tensor tracker (``kbitprep._estimate.measure_step``: a ``TorchDispatchMode``
  seeded with every tensor alive before the step, weights, quantization state, adapters,
  optimizer states and the batch): peak live tensor bytes over a step = the most bytes of live
  tensor storages at any point of that step, the memory rows' measure. Secondary, allocator-
  dependent: peak RSS over a step = peak RSS during a timed step minus RSS just before it (freed
  heap handed back with ``malloc_trim`` first), median over the timed steps. Persistent upcast
  bytes = parameter bytes after prepare minus before;
- ``checkpointing``: kbitprep's checkpointing options against its all-layer
  checkpointing, interleaved the same way. ``activation_offload=True`` at ``--ckpt-batch-size`` x
  ``--ckpt-seq-len`` (8 x 256), LoRA r=8 q/v on every layer, ``--ckpt-steps`` timed steps; then
  ``checkpoint_every_n_layers=2`` and ``checkpoint_trainable_blocks_only=True`` at the training
  batch with LoRA on the last ``--last-layers`` layers only, ``--steps`` timed steps; memory as in
  ``training`` (one tracked step per model, RSS secondary);
- ``options`` (``benchmarks/options.py``): keep with bf16 compute (one step of peft,
  defaults and keep at ``--options-batch-size`` x ``--options-seq-len``: step-1 losses and logits
  dtypes compared bit for bit, persistent upcast bytes), and the live activation bytes a training
  forward leaves for the backward with LoRA on the first, a middle and the last block, for every
  block checkpointed, ``checkpoint_trainable_blocks_only`` and ``checkpoint_every_n_layers=2``;
  and the per-forward cost of what ``prepare`` installs (``benchmarks/overhead.py``).

Each part is a module of ``benchmarks/parts/`` (``import_time``, ``prepare``, ``training``,
``checkpointing``, ``options``); what they share is in ``benchmarks/common.py`` (rows, statistics,
RSS, preparers, models, batches) and ``benchmarks/interleaved.py`` (interleaved training and the
live-tensor step). This file parses the arguments, runs the parts and writes the files.

A step is forward + backward + AdamW step. The tracker slows a step down, so no timed step runs
under it. Peak RSS is read from the kernel's high-water mark
(``/proc/self/status`` VmHWM, reset per step through ``/proc/self/clear_refs``); where that is
not available a thread samples RSS every 0.5 ms instead. The training and checkpointing parts run
torch on ``--threads`` threads (default 1): on a shared 2-core machine two threads slow down
several-fold whenever another process takes a core, one thread does not, and the ratios are what
is compared. Each step-time row also gives, as cross-checks, the median per-step ratio of CPU time
and the ratio of the two variants' best steps.

Runtime on this project's 2 CPU cores with the defaults: about 12 minutes when the machine is
otherwise idle (a 4 x 128 step takes about 5 s on one thread, an 8 x 256 step about 20 s), up to
about 25 under other load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

from common import KEEP, PEFT, Row, cpu_has_fast_bf16, load_nf4, param_bytes, peak_rss_method
from parts import checkpointing, import_time, prepare, training
from parts import options as options_part

HERE = Path(__file__).resolve().parent
PARTS = ("import", "prepare", "training", "checkpointing", "options")


# -- output --------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1e6:,.2f} MB"
    if unit == "s":
        return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
    if unit == "count":
        return f"{value:,.0f}"
    return repr(value) if unit == "loss" else f"{value:.6f}"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (
        ("metric", "left"),
        ("kbitprep", "right"),
        ("baseline", "right"),
        ("ratio", "right"),
        ("target", "right"),
        ("result", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ok, how = row.verdict()
        base = fmt(row.peft, row.unit) + ("" if row.baseline == PEFT else f" ({row.baseline})")
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}x"
        verdict = ("met" if ok and "within noise" not in how else how) if ok is not None else ""
        result = "; ".join(x for x in (verdict, row.note) if x)
        table.add_row(row.name, fmt(row.kbitprep, row.unit), base, ratio, row.target or "-", result)
    Console(width=200).print(table)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """The ratios of ``rows`` (results.json's objects) as bars, coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ratio(r: dict[str, Any]) -> float:  # unrounded where it is kbitprep / baseline
        return float(r["ratio"] if r.get("ratio_interval") or not r["peft"] else r["kbitprep"] / r["peft"])

    shown = [r for r in rows if r["ratio"] is not None and r["ratio"] > 0 and r["unit"] != "count"][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.6))
    colors = ["#2e7d32" if r["met"] else ("#c62828" if r["met"] is False else "#607d8b") for r in shown]
    ax.barh([r["name"] for r in shown], [ratio(r) for r in shown], color=colors)
    for y, r in enumerate(shown):
        target = r.get("target") or ""
        if target.startswith("<="):
            limit = float(target[2:].split()[0])
            ax.plot([limit, limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
        if r.get("ratio_interval"):
            ax.plot(r["ratio_interval"][:2], [y, y], color="black", linewidth=0.8)
        ax.text(ratio(r) * 1.05, y, f"{ratio(r):.3f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(
        "kbitprep / baseline (log scale; lower is better)\nblack tick: target; thin line: CI of a step-time median ratio"
    )
    fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per prepare timing (median); default 5")
    parser.add_argument("--import-repeats", type=int, default=5, help="fresh interpreters per import timing; default 5")
    parser.add_argument(
        "--steps",
        type=int,
        default=6,
        help="timed LoRA steps per model after 1 warm-up (then 1 untimed step under the live-tensor tracker), "
        "training and selective checkpointing; default 6",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--ckpt-steps",
        type=int,
        default=3,
        help="timed steps per model of the offload comparison after 1 warm-up (then 1 tracked); default 3",
    )
    parser.add_argument("--options-seq-len", type=int, default=64, help="bf16-compute keep step; default 64")
    parser.add_argument("--options-batch-size", type=int, default=2)
    parser.add_argument("--overhead-repeats", type=int, default=30, help="1-token forwards per overhead timing")
    parser.add_argument("--ckpt-seq-len", type=int, default=256)
    parser.add_argument("--ckpt-batch-size", type=int, default=8)
    parser.add_argument(
        "--last-layers",
        type=int,
        default=8,
        help="LoRA layers (the last ones) for the checkpoint_trainable_blocks_only comparison; default 8",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the training and checkpointing parts (0: torch's default); default 1, "
        "because on a shared 2-core machine two threads slow down several-fold whenever another process "
        "takes a core (each parallel region waits for the descheduled thread), one thread does not",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=("bfloat16", "float32"),
        default="float32",
        help="bitsandbytes compute dtype of the nf4 model; default float32 (the targets' setting)",
    )
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts (files written only with --out)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the output files; default benchmarks/")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: merge the parts' rows into the files in --out (default benchmarks/), replacing "
        "those parts' earlier rows and keeping the rest",
    )
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.out is None and (args.only is None or args.merge):
        args.out = HERE
    if args.merge and not ((args.out / "results.json").exists() and (args.out / "run-info.json").exists()):
        p.error(f"--merge needs results.json and run-info.json in {args.out}")
    if args.steps < 1 or args.ckpt_steps < 1:
        p.error("--steps and --ckpt-steps must be at least 1")
    return args


def merge(
    out: Path, parts: list[str], results: list[dict[str, Any]], run_info: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Merge a partial run into the files already in ``out``: its rows replace the rows of the
    same parts (by their ``part`` tag; the new rows go where the first old one of the part was,
    else at the end), its per-part records replace the same keys of run-info.json, and its title
    and settings are appended to run-info.json's ``reruns``. Returns the merged results, run info
    and the chart's title (the full run's)."""
    old_rows: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    old_info: dict[str, Any] = json.loads((out / "run-info.json").read_text())
    merged: list[dict[str, Any]] = []
    placed: set[str] = set()
    for row in old_rows:
        part = row.get("part")
        if part in parts:
            if part not in placed:
                merged += [r for r in results if r["part"] == part]
                placed.add(part)
            continue
        merged.append(row)
    merged += [r for r in results if r["part"] not in placed]
    meta = ("title", "versions", "minutes", "settings")
    for key, value in run_info.items():
        if key not in meta:
            old_info[key] = value
    old_info.setdefault("reruns", []).append({k: run_info[k] for k in meta})
    title = str(old_info.get("title", run_info["title"])) + f"; rerun: {', '.join(parts)}"
    return merged, old_info, title


def run_parts(args: argparse.Namespace, parts: list[str]) -> tuple[list[Row], dict[str, Any], int]:
    """Run the chosen parts in order, each row tagged with its part; returns the rows, the
    per-part records for run-info.json and torch's thread count before the training parts."""
    import torch

    rows: list[Row] = []
    info: dict[str, Any] = {}

    def run_part(part: str, run: Any, *extra: Any) -> None:
        first = len(rows)
        run(args, rows, *extra)
        for row in rows[first:]:
            row.part = part

    if "import" in parts:
        run_part("import", import_time.run)
    nf4 = None
    if set(parts) & {"prepare", "training", "checkpointing"}:
        print(f"SmolLM2-135M-Instruct nf4 (compute dtype {args.compute_dtype}): load ...", flush=True)
        nf4 = load_nf4(getattr(torch, args.compute_dtype))
        info["nf4_param_bytes"] = {"before": param_bytes(nf4)}
    if "prepare" in parts:
        run_part("prepare", prepare.run, nf4, info)
    default_threads = torch.get_num_threads()
    if args.threads and set(parts) & {"training", "checkpointing"}:
        torch.set_num_threads(args.threads)
        print(f"training and checkpointing parts: {torch.get_num_threads()} torch thread(s)", flush=True)
    if "training" in parts:
        run_part("training", training.run, nf4, info)
    if "checkpointing" in parts:
        run_part("checkpointing", checkpointing.run, nf4, info)
    if "options" in parts:
        run_part("options", options_part.run, info)
    return rows, info, default_threads


def settings(args: argparse.Namespace, parts: list[str], default_threads: int) -> dict[str, Any]:
    """run-info.json's ``settings``."""
    import torch

    return {
        "parts": parts,
        "repeats": args.repeats,
        "import_repeats": args.import_repeats,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "ckpt_steps": args.ckpt_steps,
        "ckpt_seq_len": args.ckpt_seq_len,
        "ckpt_batch_size": args.ckpt_batch_size,
        "last_layers": args.last_layers,
        "keep_in_low_precision": list(KEEP),
        "lora": "r=8, alpha=16, dropout 0, q_proj+v_proj, AdamW lr 2e-3; torch.manual_seed(0) before each get_peft_model",
        "step": "forward + backward + AdamW step; step 1 is the warm-up, the rest are timed",
        "nf4_compute_dtype": args.compute_dtype,
        "peak_live_tensor_bytes": "one untimed step per model after the timed ones, under "
        "kbitprep._estimate.measure_step (TorchDispatchMode storage tracker seeded with every tensor alive "
        "before the step); the memory rows",
        "peak_rss": peak_rss_method()
        + " (growth = peak during the step - RSS just before it, after gc + malloc_trim); secondary rows",
        "cpu_bf16_native": cpu_has_fast_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "threads": {"import_and_prepare": default_threads, "training_and_checkpointing": torch.get_num_threads()},
        "load_average_at_end": list(os.getloadavg()),
    }


def title_of(args: argparse.Namespace) -> str:
    import peft
    import torch
    import transformers

    import kbitprep

    return (
        f"kbitprep {kbitprep.__version__} vs peft {peft.__version__} (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {os.cpu_count()} CPU cores; SmolLM2-135M nf4, compute {args.compute_dtype}; "
        f"LoRA r=8 q/v; {torch.get_num_threads()} torch thread(s); {args.steps} timed steps of {args.batch_size}x{args.seq_len}, "
        f"{args.ckpt_steps} of {args.ckpt_batch_size}x{args.ckpt_seq_len}; medians)"
    )


def report(rows: list[Row], title: str, minutes: float) -> None:
    """The console table, each missed target and the run time."""
    print_table(rows, title)
    for row in rows:
        ok, how = row.verdict()
        if ok is False:
            print(f"target missed: {row.name}: {how}")
    print(f"{minutes:.1f} min")


def write(
    args: argparse.Namespace, parts: list[str], rows: list[Row], run_info: dict[str, Any], minutes: float
) -> None:
    """results.json, run-info.json and results.png in ``--out``, merged with what is there under
    ``--merge``."""
    args.out.mkdir(parents=True, exist_ok=True)
    results = [r.to_dict() for r in rows]
    title = run_info["title"]
    if args.merge:
        results, run_info, title = merge(args.out, parts, results, run_info)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "run-info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    plot(results, args.out / "results.png", title)
    print(f"wrote results.json, results.png and run-info.json to {args.out} in {minutes:.1f} min")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    parts = args.only or list(PARTS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    started = time.perf_counter()

    import torch

    torch.manual_seed(0)
    import peft
    import transformers

    import kbitprep

    versions = (
        f"kbitprep {kbitprep.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"{versions}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, peak RSS: {peak_rss_method()}",
        flush=True,
    )
    rows, info, default_threads = run_parts(args, parts)

    minutes = (time.perf_counter() - started) / 60
    title = title_of(args)
    report(rows, title, minutes)
    if args.out is None:
        print("partial run (--only): no files written; pass --out DIR to keep them")
        return 0
    run_info: dict[str, Any] = {
        "title": title,
        "versions": versions,
        "minutes": round(minutes, 1),
        "settings": settings(args, parts, default_threads),
        **info,
    }
    write(args, parts, rows, run_info, minutes)
    assert all(math.isfinite(float(r.kbitprep)) and math.isfinite(float(r.peft)) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
