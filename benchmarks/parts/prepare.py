"""The ``prepare`` part: prepare wall time, parameter bytes after prepare and peak RSS during
prepare on a 134.5 M-parameter Llama with SmolLM2-135M's shape in bf16 flagged 4-bit by hand, and
on the real SmolLM2-135M-Instruct quantized nf4 by bitsandbytes; median of ``--repeats``,
interleaved."""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

from common import PREPARERS, PeakRSS, Row, median, param_bytes, rss, trim_heap


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


def measure_prepare(source: Any, repeats: int, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Prepare fresh copies of ``source``, preparers interleaved; wall times, bytes, peak RSS
    during prepare minus RSS after it."""
    out: dict[str, dict[str, Any]] = {n: {"seconds": [], "rss": []} for n in names}
    out["before"] = {"bytes": param_bytes(source)}
    for i in range(repeats):
        for name in names if i % 2 == 0 else tuple(reversed(names)):
            model = copy.deepcopy(source)
            trim_heap()
            with PeakRSS() as peak:
                t = time.perf_counter()
                PREPARERS[name](model)
                out[name]["seconds"].append(time.perf_counter() - t)
            out[name]["rss"].append(max(0, peak.peak - rss()))
            out[name]["bytes"] = param_bytes(model)
            del model
            trim_heap()
    return out


def prepare_rows(res: dict[str, dict[str, Any]], timed: str, sized: str) -> list[Row]:
    """Prepare time (target <= 1.0x peft), parameter bytes after and peak RSS during prepare."""
    return [
        Row(
            f"prepare time, {timed}", median(res["kbitprep"]["seconds"]), median(res["peft"]["seconds"]), "s", "<= 1.0"
        ),
        Row(
            f"param bytes after prepare, {sized}",
            res["kbitprep"]["bytes"],
            res["peft"]["bytes"],
            "bytes",
            note="same policy as peft",
        ),
        Row(
            f"peak RSS in prepare - after, {sized}", median(res["kbitprep"]["rss"]), median(res["peft"]["rss"]), "bytes"
        ),
    ]


def run(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    print("134.5M bf16 model flagged 4-bit: prepare ...", flush=True)
    synth = smollm2_shaped_bf16()
    res = measure_prepare(synth, args.repeats, ("kbitprep", "peft"))
    info["prepare_134.5M_bf16"] = res
    del synth
    trim_heap()
    rows += prepare_rows(res, "134.5M bf16 flagged 4-bit", "134.5M bf16")

    print("SmolLM2-135M-Instruct nf4: prepare ...", flush=True)
    res = measure_prepare(nf4, args.repeats, ("kbitprep", "peft", "keep"))
    info["prepare_nf4"] = res
    rows += prepare_rows(res, "SmolLM2 nf4", "SmolLM2 nf4")
    rows.insert(
        len(rows) - 2,
        Row(
            "prepare time, SmolLM2 nf4, keep lm_head+embed",
            median(res["keep"]["seconds"]),
            median(res["peft"]["seconds"]),
            "s",
        ),
    )
