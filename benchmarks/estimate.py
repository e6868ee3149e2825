"""How close ``kbitprep.estimate`` comes to the measured peak of a training step.

Part 1, the accuracy matrix: for each tiny architecture (Llama, Qwen2 with tied embeddings,
Gemma2, a Mixtral-style MoE, T5, a Llava-style VLM) × quantization (bitsandbytes nf4 with fp32
compute, LLM.int8 on an fp16 checkpoint, unquantized bf16) × checkpointing layout (every block,
every 2nd block, off) × sequence length (64, 256), the ratio predicted / measured of the peak of
live tensor bytes over a steady-state training step on this machine's CPU (batch 2, LoRA r=8,
AdamW). The measurement and the prediction are the test suite's (``tests/test_estimate.py``:
``measured`` loads the saved checkpoint with its quantization, prepares it with kbitprep,
attaches LoRA, takes one step and measures the next with ``kbitprep._estimate.measure_step``;
``predicted`` calls ``kbitprep.estimate`` on the model built on the meta device from the same
``config.json``).

Part 2, a Llama-3-8B-shaped config built on the meta device (no weights), nf4 with bf16 compute
and double quantization, LoRA r=16 on every linear layer, AdamW, batch 4 × 2048 tokens, predicted
for CUDA, every block checkpointed: the estimate's table, next to the weights-only figure that
``accelerate estimate-memory`` gives (parameter count × bytes per parameter of the dtype: 0.5 for
int4, 2 for bf16), computed here from the parameter count.

Usage: ``python benchmarks/estimate.py [--quick] [--json PATH]`` (``--quick``: Llama only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ARCHS = ("llama", "qwen2", "gemma2", "mixtral", "t5", "llava")
QUANTS = ("nf4", "int8", "bf16")
LAYOUTS = ("all", "every2", "off")
SEQS = (64, 256)

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def matrix(archs: tuple[str, ...], root: str) -> list[dict[str, Any]]:
    import test_estimate as t  # the test suite's builders: one definition of "measured"

    rows: list[dict[str, Any]] = []
    for arch in archs:
        for quant in QUANTS:
            for layout in LAYOUTS:
                for seq in SEQS:
                    case = t.Case(arch, quant, layout, seq)
                    start = time.perf_counter()
                    tracker = t.measured(root, case)[0]
                    est = t.predicted(root, case)
                    rows.append(
                        {
                            "case": case.id,
                            "measured": tracker.peak,
                            "predicted": est.peak_bytes,
                            "ratio": est.peak_bytes / tracker.peak,
                            "measured_at": tracker.peak_at,
                            "predicted_at": est.peak_at,
                            "seconds": round(time.perf_counter() - start, 2),
                        }
                    )
                    print(f"  {case.id:28s} {rows[-1]['ratio']:.4f}", file=sys.stderr, flush=True)
    return rows


def print_matrix(rows: list[dict[str, Any]], archs: tuple[str, ...]) -> None:
    by_id = {r["case"]: r for r in rows}
    columns = [(lay, seq) for lay in LAYOUTS for seq in SEQS]
    print(
        "Predicted / measured peak of live tensor bytes, one steady-state training step (CPU, batch 2, LoRA r=8, AdamW)"
    )
    print()
    print("| model | quantization | " + " | ".join(f"ckpt {lay}, {seq} tok" for lay, seq in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for arch in archs:
        for quant in QUANTS:
            cells = [f"{by_id[f'{arch}-{quant}-{lay}-{seq}']['ratio']:.4f}" for lay, seq in columns]
            print(f"| {arch} | {quant} | " + " | ".join(cells) + " |")
    ratios = [r["ratio"] for r in rows]
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    same_phase = sum(r["measured_at"] == r["predicted_at"] for r in rows)
    print()
    print(
        f"{len(rows)} cases: ratio min {min(ratios):.4f}, max {max(ratios):.4f}; worst {worst['case']} "
        f"({worst['ratio']:.4f}); within ±10 %: {sum(abs(x - 1) <= 0.10 for x in ratios)}/{len(rows)}; "
        f"peak in the same phase: {same_phase}/{len(rows)}"
    )


def llama3_8b() -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    import kbitprep

    config = LlamaConfig(**LLAMA3_8B)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    params = sum(p.numel() for p in model.parameters())
    qc = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    adapter = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    start = time.perf_counter()
    est = kbitprep.estimate(model, batch_size=4, seq_len=2048, adapter=adapter, quantization_config=qc)
    seconds = time.perf_counter() - start
    print()
    print(f"Llama-3-8B-shaped config ({params:,} parameters), built on the meta device; estimated in {seconds:.1f} s")
    print()
    print(est)
    print()
    print("accelerate estimate-memory, weights only (parameters x bytes per parameter):")
    for name, per in (("int4", 0.5), ("int8", 1), ("bfloat16", 2), ("float32", 4)):
        print(f"  {name:9s} {_gib(params * per):>12}")
    print(
        f"kbitprep.estimate peak / accelerate int4 weights: {est.peak_bytes / (params * 0.5):.2f}x "
        f"({_gib(est.peak_bytes)} vs {_gib(params * 0.5)})"
    )
    return {"params": params, "seconds": round(seconds, 1), "estimate": est.to_dict()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llama only")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.simplefilter("ignore")
    archs = ("llama",) if args.quick else ARCHS
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        rows = matrix(archs, root)
        print_matrix(rows, archs)
        print(f"(matrix measured and predicted in {time.perf_counter() - start:.0f} s)")
    big = llama3_8b()
    if args.json:
        Path(args.json).write_text(json.dumps({"matrix": rows, "llama3_8b": big}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
