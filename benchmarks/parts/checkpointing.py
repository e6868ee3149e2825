"""The ``checkpointing`` part: kbitprep's checkpointing options against its all-layer
checkpointing, interleaved as in the ``training`` part. ``activation_offload=True`` at
``--ckpt-batch-size`` x ``--ckpt-seq-len`` with LoRA on every layer; then
``checkpoint_every_n_layers=2`` and ``checkpoint_trainable_blocks_only=True`` at the training batch
with LoRA on the last ``--last-layers`` layers only."""

from __future__ import annotations

import argparse
from typing import Any

from common import Row, kbit_prepare, make_batches
from interleaved import (
    RSS_NOTE,
    Variant,
    live_note,
    live_peak,
    release,
    rss_step,
    run_record,
    step_time_row,
    train_interleaved,
)

LAYERS = 30  # SmolLM2-135M's decoder layers


def _offload(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    """``activation_offload=True`` against all-layer checkpointing without it, LoRA on every layer."""
    b, s = args.ckpt_batch_size, args.ckpt_seq_len
    print(
        f"activation offload (issue 13): {args.ckpt_steps} timed steps + 1 warm-up + 1 tracked of {b}x{s} tokens ...",
        flush=True,
    )
    variants = [
        Variant("without offload", kbit_prepare()),
        Variant("activation_offload=True", kbit_prepare(activation_offload=True)),
    ]
    runs = train_interleaved(nf4, variants, make_batches(args.ckpt_steps + 2, s, b, seed=1), "offload")
    info["offload"] = run_record(runs)
    base, offload = runs["without offload"], runs["activation_offload=True"]
    applied = offload.plan.get("activation_offload")
    why = "; ".join(w for w in offload.plan.get("warnings", []) if "activation_offload" in w)
    decision = "plan applied offload" if applied else "plan did not apply offload: " + (why or "no reason given")
    base_name = f"without offload, {base.checkpointed} of {LAYERS} layers checkpointed"
    rows.append(
        Row(
            f"activation_offload=True: peak live tensor bytes over a {b}x{s} step",
            live_peak(offload),
            live_peak(base),
            "bytes",
            baseline=base_name,
            note=f"{decision}; {live_note(offload, base)}",
        )
    )
    rows.append(
        Row(
            f"activation_offload=True: peak RSS over a {b}x{s} step (secondary)",
            rss_step(offload),
            rss_step(base),
            "bytes",
            baseline=base_name,
            note=RSS_NOTE,
        )
    )
    label = f"activation_offload=True: {b}x{s} step time"
    rows.append(step_time_row(runs, label, "activation_offload=True", "without offload", baseline=base_name))
    release(runs)


def _layouts(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    """``checkpoint_every_n_layers=2`` and ``checkpoint_trainable_blocks_only`` against every layer
    checkpointed, LoRA on the last ``--last-layers`` layers."""
    last = tuple(range(LAYERS - args.last_layers, LAYERS))
    b, s = args.batch_size, args.seq_len
    print(
        f"checkpointing layouts (issue 13): LoRA on the last {args.last_layers} layers, {args.steps} timed steps "
        f"+ 1 warm-up + 1 tracked of {b}x{s} tokens ...",
        flush=True,
    )
    variants = [
        Variant("all layers", kbit_prepare(), layers=last),
        Variant("every 2nd layer", kbit_prepare(checkpoint_every_n_layers=2), layers=last),
        Variant("trainable blocks only", kbit_prepare(checkpoint_trainable_blocks_only=True), layers=last),
    ]
    runs = train_interleaved(nf4, variants, make_batches(args.steps + 2, s, b, seed=2), "layouts")
    info["layouts"] = run_record(runs)
    base = runs["all layers"]
    base_name = f"all {base.checkpointed} layers checkpointed"
    where = f"{b}x{s} step, LoRA on last {args.last_layers}"
    for name, option in (
        ("every 2nd layer", "checkpoint_every_n_layers=2"),
        ("trainable blocks only", "checkpoint_trainable_blocks_only"),
    ):
        trained = runs[name]
        rows.append(
            Row(
                f"{option}: peak live tensor bytes over a {where}",
                live_peak(trained),
                live_peak(base),
                "bytes",
                baseline=base_name,
                note=f"{trained.checkpointed} of {LAYERS} layers checkpointed at training time; {live_note(trained, base)}",
            )
        )
        rows.append(
            Row(
                f"{option}: peak RSS over a {where} (secondary)",
                rss_step(trained),
                rss_step(base),
                "bytes",
                baseline=base_name,
                note=RSS_NOTE,
            )
        )
        rows.append(step_time_row(runs, f"{option}: time of a {where}", name, "all layers", baseline=base_name))
    release(runs)


def run(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    _offload(args, rows, nf4, info)
    _layouts(args, rows, nf4, info)
