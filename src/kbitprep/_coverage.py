"""Which kbitprep strategy covers each transformers quantization method, and how it is tested.

One row per ``transformers.utils.quantization_config.QuantizationMethod`` value of transformers
5.24 (26 methods, ``quantizers/auto.py``). ``kbitprep backends --methods`` prints these rows and
``docs/backends/coverage.md`` is written from them (``python -m kbitprep._coverage``), so the
command and the page cannot disagree. tests/test_coverage.py fails when the installed
transformers has a method no row covers, when a row names a strategy that does not claim its
method, or when a row names a test that does not exist.

Nothing here imports transformers except :func:`installed_methods`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROWS", "CoverageRow", "installed_methods", "render_markdown", "rows_for_installed", "uncovered"]

_NO_UPCAST = "nothing"
_GENERIC = "unknown: generic freezes, wires checkpointing and warns"
_REFUSED = "no: refused, because transformers marks it not trainable (quantizer is_trainable False)"


@dataclass(frozen=True, slots=True)
class CoverageRow:
    """One quantization method.

    Attributes:
        method: The ``QuantizationMethod`` value (``quant_method`` in a config), e.g. ``"gptq"``.
        strategy: The kbitprep backend that claims it (``generic`` when none does).
        storage: What the quantized layers hold, with dtypes.
        upcast: What ``upcast="auto"`` casts.
        trains: Whether LoRA adapters train on it, and under which form.
        tests: ``"path::test_name"`` of the tests that check it on real quantized weights here.
        note: Why it is untested or does not work on this CPU, when it is not plain.
    """

    method: str
    strategy: str
    storage: str
    upcast: str
    trains: str
    tests: tuple[str, ...] = ()
    note: str = ""


ROWS: tuple[CoverageRow, ...] = (
    CoverageRow(
        "bitsandbytes",
        "bitsandbytes",
        "Params4bit uint8 (or bnb_4bit_quant_storage) / Int8Params int8",
        "peft's: fp16/bf16 parameters to upcast_dtype",
        "yes (4-bit and 8-bit)",
        ("tests/cases/test_kernel_traps.py::test_evaluation_during_training_keeps_4bit_gradients",),
    ),
    CoverageRow(
        "gptq",
        "gptq",
        "qweight/qzeros/g_idx int32 and scales fp16 buffers",
        _NO_UPCAST,
        "yes",
        ("tests/backends/test_gptq.py::test_gptq_prepare_pins_train_mode_so_an_eval_forward_cannot_stop_gradients",),
        "auto-round's auto_gptq export loads as gptq",
    ),
    CoverageRow(
        "awq",
        "awq",
        "qweight/qzeros int32 and scales fp16 buffers (gptqmodel AWQ kernels, autoawq WQLinear)",
        _NO_UPCAST,
        "yes; layers latched by an eval no-grad forward are refused",
        (
            "tests/backends/test_awq.py::test_awq_prepare_pins_train_mode_so_an_eval_forward_cannot_stop_gradients",
            "tests/backends/test_awq.py::test_awq_layers_latched_by_an_eval_forward_raise_before_anything_changes",
        ),
        "checkpoint: auto-round 0.16.1 round-to-nearest, exported as auto_awq",
    ),
    CoverageRow(
        "aqlm",
        "aqlm",
        "codes int16/int8, codebooks and scales in the load dtype",
        _NO_UPCAST,
        "yes (1x16 on CPU; 2x8 on CPU refused)",
        ("tests/backends/test_aqlm.py::test_aqlm_1x16_trains_one_step_with_lora",),
        "checkpoint synthesized (no hub download here)",
    ),
    CoverageRow(
        "vptq",
        "generic",
        "VQuantLinear indices and centroids",
        _NO_UPCAST,
        _REFUSED,
        (),
        "the vptq library is not installed here",
    ),
    CoverageRow(
        "quanto",
        "quanto",
        "WeightQBytesTensor (int8/float8) and WeightQBitsTensor (packed int2/int4) weight subclasses",
        _NO_UPCAST,
        "yes (int2/int4/int8/float8, bf16 and fp32, with or without quantized activations)",
        (
            "tests/backends/test_quanto.py::test_quanto_config_load_is_detected_kept_as_stored_and_trains",
            "tests/backends/test_quanto.py::test_quanto_own_quantize_freeze_is_found_by_its_layers_and_trains",
        ),
    ),
    CoverageRow(
        "eetq",
        "eetq",
        "weight int8 and weight_scales fp16",
        _NO_UPCAST,
        "yes",
        ("tests/backends/test_eetq.py::test_eetq_lora_trains_one_step",),
        "the CPU test stands in a pure-torch kernel: transformers fetches the real one from the hub and needs CUDA",
    ),
    CoverageRow(
        "higgs",
        "generic",
        "FLUTE-packed weights",
        _NO_UPCAST,
        _REFUSED,
        (),
        "transformers refuses HIGGS without a GPU",
    ),
    CoverageRow(
        "hqq",
        "hqq",
        "W_q uint8 (scale and zero in module.meta)",
        _NO_UPCAST,
        "yes",
        ("tests/backends/test_hqq.py::test_hqq_peft_lora_trains_and_every_layer_gets_its_compute_dtype",),
        "transformers 5.24 cannot load HqqConfig models; tested with HQQLinear built directly",
    ),
    CoverageRow(
        "compressed-tensors",
        "compressed_tensors",
        "weight_packed int32/uint8 with weight_scale (float, float8) or float8 weight",
        _NO_UPCAST,
        "weight-only schemes yes (decompressed before training, the bytes in the plan); activation-quantized "
        "schemes refused (fake-quantized under no_grad)",
        (
            "tests/backends/test_compressed_tensors.py::test_lora_trains_one_step_with_the_loss_of_the_library_own_decompression",
            "tests/backends/test_compressed_tensors.py::test_transformers_load_is_detected_decompressed_as_dequantize_would_and_trains",
            "tests/backends/test_compressed_tensors.py::test_activation_quantized_schemes_are_refused_before_anything_changes",
        ),
        "W4A16, W8A16, NVFP4A16 and FP8 layers built on CPU with compressed-tensors 0.20.1 itself",
    ),
    CoverageRow(
        "fbgemm_fp8",
        "fp8",
        "float8_e4m3fn weight and weight_scale",
        _NO_UPCAST,
        "no: refused (f8f8bf16_rowwise has no backward)",
        ("tests/backends/test_fp8.py::test_fbgemm_layers_are_refused_and_model_unchanged",),
    ),
    CoverageRow(
        "torchao",
        "torchao",
        "tensor subclasses reporting a float dtype (Int8Tensor, IntxUnpackedToInt8Tensor, ...)",
        _NO_UPCAST,
        "per config: int8 weight-only yes; intx int4 weight-only yes (prepared with a warning that "
        "transformers' Trainer refuses it unless kbitprep.mark_trainable is applied); dynamic activation no",
        ("tests/cases/test_kernel_traps.py::test_torchao_trainability_is_decided_per_layer",),
    ),
    CoverageRow(
        "gguf",
        "none",
        "nothing: transformers dequantizes GGUF files while loading",
        "peft's (unquantized model)",
        "yes, as an unquantized model",
        (),
        "the demo converts a real GGUF file (tests/test_cli.py); no test checks the verdict by itself",
    ),
    CoverageRow(
        "bitnet",
        "bitnet",
        "BitLinear: packed uint8 buffer; offline AutoBitLinear: ternary weight and weight_scale",
        _NO_UPCAST,
        "BitLinear no (refused); offline AutoBitLinear yes; online AutoBitLinear stores nothing (none)",
        (
            "tests/backends/test_bitnet.py::test_packed_bitlinear_is_refused_with_the_true_reason",
            "tests/backends/test_bitnet.py::test_offline_autobitlinear_keeps_ternary_storage_and_trains",
        ),
        "checkpoints synthesized with transformers' pack_weights",
    ),
    CoverageRow(
        "spqr",
        "generic",
        "SpQR sparse outliers and 3-bit groups",
        _NO_UPCAST,
        _REFUSED,
        (),
        "transformers refuses SpQR without a GPU",
    ),
    CoverageRow(
        "fp8",
        "fp8",
        "float8_e4m3fn weight and weight_scale_inv",
        _NO_UPCAST,
        "yes",
        ("tests/backends/test_fp8.py::test_lora_trains_and_fp8_storage_is_bit_identical",),
        "FP8Linear built directly with a CPU reference kernel: transformers dequantizes FP8 on a CPU",
    ),
    CoverageRow(
        "quark",
        "generic",
        "AMD Quark quantized layers",
        _NO_UPCAST,
        _REFUSED,
        (),
        "the quark library is not installed here",
    ),
    CoverageRow(
        "fp_quant",
        "generic",
        "FP-Quant (MXFP4/NVFP4 with Hadamard rotations)",
        _NO_UPCAST,
        "refused unless FPQuantConfig(store_master_weights=True) (quantizer is_trainable); then " + _GENERIC,
        (),
        "transformers refuses FP-Quant without a CUDA or XPU device",
    ),
    CoverageRow(
        "auto-round",
        "generic",
        "auto_round-format packed weights",
        _NO_UPCAST,
        "no: refused (transformers 5.24 AutoRoundQuantizer.is_trainable is False)",
        (),
        "the auto_gptq and auto_awq exports load as gptq and awq and train (see those rows)",
    ),
    CoverageRow(
        "mxfp4",
        "mxfp4",
        "gpt-oss experts: packed FP4 uint8 (triton_kernels tensors on a GPU)",
        _NO_UPCAST,
        "no: refused (matmul_ogs has no backward); Mxfp4Config(dequantize=True) is none and trains",
        (
            "tests/backends/test_mxfp4.py::test_packed_mxfp4_experts_are_detected_and_refused_before_anything_changes",
            "tests/cases/test_dequantized_label.py::test_label_without_storage_is_unquantized_and_trains",
        ),
        "MXFP4 layers built directly: on a CPU without triton transformers loads MXFP4 dequantized",
    ),
    CoverageRow(
        "nvfp4",
        "generic",
        "NVFP4 packed weights",
        _NO_UPCAST,
        _REFUSED,
        (),
        "transformers requires a CUDA GPU and the hub kernels",
    ),
    CoverageRow(
        "mxfp8",
        "fp8",
        "float8 weight and e8m0 block scales",
        _NO_UPCAST,
        "as fp8",
        (),
        "only the finegrained fp8 layers are built on this CPU",
    ),
    CoverageRow(
        "metal",
        "generic",
        "Apple Metal quantized weights",
        _NO_UPCAST,
        _REFUSED,
        (),
        "needs an Apple Silicon GPU (MPS)",
    ),
    CoverageRow(
        "fouroversix",
        "generic",
        "four-over-six FP4 weights",
        _NO_UPCAST,
        "refused unless keep_master_weights=True (quantizer is_trainable); then " + _GENERIC,
        (),
        "the fouroversix library is not installed here",
    ),
    CoverageRow(
        "sinq",
        "generic",
        "SINQ quantized weights",
        _NO_UPCAST,
        _GENERIC,
        (),
        "the sinq library is not installed here",
    ),
    CoverageRow(
        "gemma",
        "generic",
        "Gemma quantized checkpoints",
        _NO_UPCAST,
        _REFUSED,
        (),
        "its checkpoints were not tried on this CPU",
    ),
)


def installed_methods() -> tuple[str, ...]:
    """The ``QuantizationMethod`` values of the installed transformers (imports transformers)."""
    from transformers.utils.quantization_config import QuantizationMethod

    return tuple(str(m.value) for m in QuantizationMethod)


def uncovered(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods in ``methods`` that no row of :data:`ROWS` covers."""
    known = {row.method for row in ROWS}
    return tuple(m for m in methods if m not in known)


def rows_for_installed() -> tuple[CoverageRow, ...]:
    """The rows of the installed transformers' methods, in its enum order; a method without a
    row gets one that says so (strategy ``generic``)."""
    by_method = {row.method: row for row in ROWS}
    return tuple(
        by_method.get(m) or CoverageRow(m, "generic", "unknown", _NO_UPCAST, _GENERIC, (), "no coverage row yet")
        for m in installed_methods()
    )


def render_markdown(rows: tuple[CoverageRow, ...], transformers_version: str) -> str:
    """The docs page: one table row per method."""
    lines = [
        "# Coverage: every transformers quantization method",
        "",
        f"Generated by `python -m kbitprep._coverage` from `kbitprep._coverage.ROWS` for transformers "
        f"{transformers_version}; `kbitprep backends --methods` prints the same rows. 'auto upcast' is what "
        '`upcast="auto"` casts. A test named here runs on real quantized weights on a CPU unless its note '
        "says otherwise.",
        "",
        "| method | strategy | storage | auto upcast | trains | tested here | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tests = "<br>".join(f"`{t}`" for t in row.tests) or "no"
        cells = (f"`{row.method}`", f"`{row.strategy}`", row.storage, row.upcast, row.trains, tests, row.note)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    """Write the docs page (default docs/backends/coverage.md) from the installed transformers."""
    from importlib.metadata import version

    out = Path(argv[0] if argv else "docs/backends/coverage.md")
    out.write_text(render_markdown(rows_for_installed(), version("transformers")))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
