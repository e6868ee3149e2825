"""The ``training`` part (issue 11's targets): SmolLM2 nf4, LoRA r=8 on q_proj/v_proj, five
models in one process (peft, kbitprep defaults, kbitprep with ``keep_in_low_precision=("lm_head",
"embed_tokens")``, kbitprep with ``upcast="none"`` and, as a diagnostic, the keep setting with
peft's ``use_reentrant=True``) stepped in turn on the same batches (:mod:`interleaved`)."""

from __future__ import annotations

import argparse
from typing import Any

from common import PREPARERS, Row, make_batches
from interleaved import (
    RSS_NOTE,
    Trained,
    Variant,
    live_added,
    live_note,
    live_peak,
    release,
    rss_step,
    run_record,
    step_time_row,
    train_interleaved,
)

NAMES = ("peft", "kbitprep", "keep", "none", "keep reentrant")
KEEP_LABEL = "keep lm_head+embed"
REENTRANT_LABEL = "keep lm_head+embed, use_reentrant=True"
DIAGNOSTIC = "diagnostic: peft's checkpointing mode; not a target; "


def _defaults_numerics(peft: Trained, kb: Trained, n_timed: int) -> list[Row]:
    """kbitprep's defaults against peft: every parameter's dtype, the step-1 loss and the loss at
    the last timed step, bit for bit."""
    same = sum(kb.dtypes.get(n) == d for n, d in peft.dtypes.items()) if kb.dtypes.keys() == peft.dtypes.keys() else -1
    differ = [n for n, d in peft.dtypes.items() if kb.dtypes.get(n) != d]
    all_equal = kb.losses == peft.losses
    return [
        Row(
            "defaults: parameters with peft's dtype",
            float(same),
            float(len(peft.dtypes)),
            "count",
            "bit-exact",
            note="; ".join(differ[:3]) if differ else "every parameter's dtype as peft's",
        ),
        Row("defaults: step-1 loss", kb.losses[0], peft.losses[0], "loss", "bit-exact", note=f"{kb.losses[0].hex()}"),
        Row(
            f"defaults: loss at step {n_timed + 1}",
            kb.losses[-1],
            peft.losses[-1],
            "loss",
            "bit-exact",
            note="all steps bit-identical" if all_equal else "steps differ",
        ),
    ]


def _defaults_costs(runs: dict[str, Trained]) -> list[Row]:
    """kbitprep's defaults against peft: step time, peak live tensor bytes and peak RSS."""
    kb, peft = runs["kbitprep"], runs["peft"]
    return [
        step_time_row(runs, "defaults: step time", "kbitprep", "peft", "<= 1.0 within noise"),
        Row(
            "defaults: peak live tensor bytes over a step",
            live_peak(kb),
            live_peak(peft),
            "bytes",
            note=f"use_reentrant: kbitprep {kb.plan.get('use_reentrant')}, peft True (torch's default); "
            + live_note(kb, peft),
        ),
        Row("defaults: peak RSS over a step (secondary)", rss_step(kb), rss_step(peft), "bytes", note=RSS_NOTE),
    ]


def _keep_vs_peft(runs: dict[str, Trained]) -> list[Row]:
    """keep against peft: step-1 loss, persistent upcast bytes, step time and memory."""
    keep, peft = runs["keep"], runs["peft"]
    return [
        Row(
            f"{KEEP_LABEL}: step-1 loss", keep.losses[0], peft.losses[0], "loss", "bit-exact", note=keep.losses[0].hex()
        ),
        Row(f"{KEEP_LABEL}: persistent upcast bytes", keep.upcast_bytes, peft.upcast_bytes, "bytes", "<= 0.05"),
        step_time_row(runs, f"{KEEP_LABEL}: step time", "keep", "peft", "<= 1.05"),
        Row(
            f"{KEEP_LABEL}: peak live tensor bytes over a step",
            live_peak(keep),
            live_peak(peft),
            "bytes",
            "<= 1.0",
            note=live_note(keep, peft),
        ),
        Row(f"{KEEP_LABEL}: peak RSS over a step (secondary)", rss_step(keep), rss_step(peft), "bytes", note=RSS_NOTE),
        Row(
            f"{KEEP_LABEL}: live tensor bytes added over a step",
            live_added(keep),
            live_added(peft),
            "bytes",
            note="peak of the step minus the live bytes before it (activations, gradients, weights brought up at use)",
        ),
    ]


def _keep_vs_defaults(keep: Trained, kb: Trained) -> list[Row]:
    """keep against kbitprep's defaults (the same checkpointing mode): peak live bytes and RSS."""
    return [
        Row(
            f"{KEEP_LABEL}: peak live tensor bytes over a step vs kbitprep defaults",
            live_peak(keep),
            live_peak(kb),
            "bytes",
            baseline="kbitprep defaults",
            note="same checkpointing mode (use_reentrant=False); " + live_note(keep, kb),
        ),
        Row(
            f"{KEEP_LABEL}: peak RSS over a step vs kbitprep defaults (secondary)",
            rss_step(keep),
            rss_step(kb),
            "bytes",
            baseline="kbitprep defaults",
            note=RSS_NOTE,
        ),
    ]


def _keep_reentrant(runs: dict[str, Trained]) -> list[Row]:
    """The diagnostic: keep with peft's ``use_reentrant=True`` against peft; no targets."""
    keep_re, peft = runs["keep reentrant"], runs["peft"]
    return [
        Row(
            f"{REENTRANT_LABEL}: peak live tensor bytes over a step",
            live_peak(keep_re),
            live_peak(peft),
            "bytes",
            note=DIAGNOSTIC + live_note(keep_re, peft),
        ),
        Row(
            f"{REENTRANT_LABEL}: peak RSS over a step (secondary)",
            rss_step(keep_re),
            rss_step(peft),
            "bytes",
            note="diagnostic; " + RSS_NOTE,
        ),
        step_time_row(runs, f"{REENTRANT_LABEL}: step time", "keep reentrant", "peft", note_prefix=DIAGNOSTIC),
    ]


def _upcast_none(runs: dict[str, Trained]) -> list[Row]:
    """``upcast="none"`` against peft: step-1 loss, persistent upcast bytes, step time, memory."""
    none, peft = runs["none"], runs["peft"]
    return [
        Row('upcast="none": step-1 loss', none.losses[0], peft.losses[0], "loss", note=f"{none.losses[0].hex()}"),
        Row('upcast="none": persistent upcast bytes', none.upcast_bytes, peft.upcast_bytes, "bytes"),
        step_time_row(runs, 'upcast="none": step time', "none", "peft", "<= 1.05"),
        Row(
            'upcast="none": peak live tensor bytes over a step',
            live_peak(none),
            live_peak(peft),
            "bytes",
            note=live_note(none, peft),
        ),
        Row('upcast="none": peak RSS over a step (secondary)', rss_step(none), rss_step(peft), "bytes", note=RSS_NOTE),
    ]


def run(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    print(
        f"LoRA training (issue 11): {args.steps} timed steps + 1 warm-up + 1 tracked of {args.batch_size}x"
        f"{args.seq_len} tokens, five models stepped in turn ...",
        flush=True,
    )
    variants = [Variant(n, PREPARERS[n]) for n in NAMES]
    batches = make_batches(args.steps + 2, args.seq_len, args.batch_size, seed=0)
    runs = train_interleaved(nf4, variants, batches, "training")
    info["training"] = run_record(runs)
    rows += _defaults_numerics(runs["peft"], runs["kbitprep"], args.steps)
    rows += _defaults_costs(runs)
    rows += _keep_vs_peft(runs)
    rows += _keep_vs_defaults(runs["keep"], runs["kbitprep"])
    rows += _keep_reentrant(runs)
    rows += _upcast_none(runs)
    release(runs)
