"""The ``options`` part (issue 16): the rows of what ``benchmarks/options.py`` (keep with bf16
compute; the activation bytes selective checkpointing leaves for the backward) and
``benchmarks/overhead.py`` (the per-forward cost of what ``prepare`` installs) measure.

``import options`` in here is ``benchmarks/options.py``, the measuring module, not this one."""

from __future__ import annotations

import argparse
from typing import Any

from common import PREPARERS, Row, kbit_prepare, load_nf4, make_batches, trim_heap


def _keep_bf16(args: argparse.Namespace, rows: list[Row], info: dict[str, Any]) -> None:
    """One step each of peft, defaults and keep with bf16 compute: step-1 losses and logits dtypes
    bit for bit, persistent upcast bytes."""
    import options
    import torch

    b, s = args.options_batch_size, args.options_seq_len
    print(f"keep with bf16 compute (issue 16): one {b}x{s} step each of peft, defaults, keep ...", flush=True)
    nf4_bf16 = load_nf4(torch.bfloat16)
    batch = make_batches(1, s, b, seed=3)[0]
    res = options.keep_numerics(nf4_bf16, {n: PREPARERS[n] for n in ("peft", "kbitprep", "keep")}, batch)
    info["keep_bf16_compute"] = res
    del nf4_bf16
    trim_heap()
    peft, kb, keep = res["peft"], res["kbitprep"], res["keep"]
    where = f"bf16 compute, {b}x{s}"
    same_dtype = keep["logits_dtype"] == kb["logits_dtype"] == peft["logits_dtype"]
    rows.append(
        Row(
            f"keep vs defaults: step-1 loss, {where}",
            keep["loss"],
            kb["loss"],
            "",
            "bit-exact",
            baseline="kbitprep defaults",
        )
    )
    rows.append(Row(f"keep vs peft: step-1 loss, {where}", keep["loss"], peft["loss"], "", "bit-exact"))
    rows.append(
        Row(
            f"keep: logits dtype as peft's, {where}",
            float(same_dtype),
            1.0,
            "count",
            "bit-exact",
            note=f"keep {keep['logits_dtype']}, defaults {kb['logits_dtype']}, peft {peft['logits_dtype']}",
        )
    )
    rows.append(
        Row(
            f"keep: persistent upcast bytes, {where}",
            float(keep["upcast_bytes"]),
            float(peft["upcast_bytes"]),
            "bytes",
            "<= 0.05",
            note=f"lm_head stored {keep['lm_head_dtype']} (peft: {peft['lm_head_dtype']})",
        )
    )


def _overhead(args: argparse.Namespace, rows: list[Row], info: dict[str, Any]) -> None:
    """The per-forward cost of what ``prepare`` installs against a 1-token forward."""
    import overhead

    print("per-forward overhead of what prepare installs (issue 16) ...", flush=True)
    cost = overhead.measure(args.overhead_repeats)
    info["per_forward_overhead"] = cost
    trim_heap()
    rows.append(
        Row(
            "keep: installed cost per 1-token forward (eval, generate step)",
            cost["installed_s"],
            cost["forward_1tok_eval_s"],
            "s",
            "<= 0.005",
            baseline="1-token forward, SmolLM2 nf4",
            note=f"adoption hook {cost['hook_s'] * 1e6:.1f} us + registration hooks {cost['registration_hooks_s'] * 1e6:.1f} us",
        )
    )
    rows.append(
        Row(
            "keep: installed cost per 1-token forward (train)",
            cost["installed_s"],
            cost["forward_1tok_train_s"],
            "s",
            "<= 0.005",
            baseline="1-token forward, SmolLM2 nf4",
            note=f"walks in 3 train forwards + 16-token generate: {cost['walks_by_hook_in_3_train_forwards_and_16_token_generate']}; "
            f"one walk (paid every forward before): {cost['walk_s'] * 1e3:.2f} ms",
        )
    )


def _saved_bytes(args: argparse.Namespace, rows: list[Row], info: dict[str, Any]) -> None:
    """The activation bytes a training forward leaves for the backward with LoRA on the first, a
    middle and the last block, under three checkpointing layouts."""
    import options
    import torch

    positions = {"first": 0, "middle": 15, "last": 29}
    layouts = {
        "all blocks": kbit_prepare(),
        "trainable blocks only": kbit_prepare(checkpoint_trainable_blocks_only=True),
        "every 2nd block": kbit_prepare(checkpoint_every_n_layers=2),
    }
    b, s = args.batch_size, args.seq_len
    print(f"saved activation bytes (issue 16): LoRA on one block, {b}x{s}, three layouts ...", flush=True)
    batch = make_batches(1, s, b, seed=4)[0]
    saved = options.saved_bytes(nf4_fp32 := load_nf4(getattr(torch, args.compute_dtype)), layouts, positions, batch)
    del nf4_fp32
    trim_heap()
    info["saved_activation_bytes"] = saved
    for where, by_layout in saved.items():
        base = by_layout["all blocks"]
        for name in ("trainable blocks only", "every 2nd block"):
            target = "<= 1.0" if name == "trainable blocks only" else ""
            rows.append(
                Row(
                    f"{name}: activation bytes kept for the backward, LoRA on the {where} block, {b}x{s}",
                    float(by_layout[name]),
                    float(base),
                    "bytes",
                    target,
                    baseline="every block checkpointed",
                    note="live tensor bytes after the forward (TorchDispatchMode tracker), not RSS",
                )
            )


def run(args: argparse.Namespace, rows: list[Row], info: dict[str, Any]) -> None:
    """Issue 16: keep's numerics with bf16 compute, the per-forward cost of what prepare installs,
    and the activation bytes selective checkpointing leaves for the backward."""
    _keep_bf16(args, rows, info)
    _overhead(args, rows, info)
    _saved_bytes(args, rows, info)
