"""Memory cost of upcasting: shown before it is paid, and exactly what is paid (C01, C02)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import param_bytes, plan_dtype
from _models import NORM_NAMES, load, saved_tiny, standard_batch
from _plan_warnings import emitted_of, has_warning, warnings_of
from _quantized import CPU_KINDS, need

KEEP_EMBED_AND_HEAD = ("model.embed_tokens", "lm_head")


def _byte_warnings(texts: Any, figure: int) -> list[str]:
    pattern = re.compile(rf"\b{figure:,}\b|\b{figure}\b")
    return [t for t in texts if pattern.search(str(t))]


def test_unquantized_plan_shows_the_upcast_cost_and_changes_nothing(model_root: str) -> None:
    """C01: a bf16 model is detected as unquantized; the dry run lists 21 bf16→fp32 casts worth
    +420,480 bytes and leaves every parameter as loaded (dtype, data_ptr, requires_grad)."""
    model = load(saved_tiny(model_root))
    assert kbitprep.detect_backend(model).backend == "none"
    before = {n: (p.dtype, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()}
    assert param_bytes(model) == 420_480

    p = kbitprep.plan(model)

    assert len(p.casts) == 21
    assert all(c.from_dtype == torch.bfloat16 and c.to_dtype == torch.float32 for c in p.casts)
    assert all(c.bytes_after == 2 * c.bytes_before for c in p.casts)
    assert p.bytes_delta == 420_480
    assert {n: (q.dtype, q.data_ptr(), q.requires_grad) for n, q in model.named_parameters()} == before
    assert all(q.dtype == torch.bfloat16 for q in model.parameters())
    assert param_bytes(model) == 420_480


def test_unquantized_prepare_warns_with_the_bytes_it_adds_and_undo_is_bit_exact(model_root: str) -> None:
    """C01: prepare with auto upcast doubles the parameters to 840,960 bytes, reports
    bytes_delta 420,480 (= the measured change), warns with that figure in the report and as a
    Python warning; undo returns all 21 parameters to bf16, bit-identical."""
    model = load(saved_tiny(model_root))
    copies = {n: p.detach().clone() for n, p in model.named_parameters()}

    with pytest.warns(kbitprep.KbitPrepWarning) as record:
        report = kbitprep.prepare(model)

    assert param_bytes(model) == 840_960
    assert report.bytes_delta == 420_480 == param_bytes(model) - 420_480
    assert _byte_warnings(warnings_of(report, "memory"), 420_480), report.warnings
    assert _byte_warnings(emitted_of(record, kbitprep.MemoryWarning), 420_480)

    report.undo()
    assert len(copies) == 21
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, n
        assert torch.equal(p.detach(), copies[n]), n
    assert param_bytes(model) == 420_480


def test_unquantized_upcast_none_costs_nothing(model_root: str) -> None:
    """C01: upcast="none" plans 0 casts and bytes_delta 0, keeps every parameter bf16, and
    emits no byte warning."""
    model = load(saved_tiny(model_root))
    with pytest.warns(kbitprep.KbitPrepWarning) as record:  # the "checkpointing left off" note only
        report = kbitprep.prepare(model, upcast="none")
    assert report.casts == () and report.bytes_delta == 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not _byte_warnings(report.warnings, 420_480) and not has_warning(report, "memory")
    assert not any("bytes" in str(w.message) for w in record)
    assert [w.category for w in record] == [kbitprep.CheckpointingWarning], [str(w.message) for w in record]


def test_4bit_embeddings_and_lm_head_dominate_the_upcast_cost(model_root: str) -> None:
    """C02: on the bnb 4-bit model auto upcast plans 7 casts; embed_tokens and lm_head are
    (1000, 64), 128,000 → 256,000 bytes each; bytes_delta 256,640; the plan changes nothing.
    prepare then moves the parameters from 297,600 to 554,240 bytes = report.bytes_delta."""
    need("bitsandbytes")
    from _quantized import bnb4

    model = bnb4(model_root)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert param_bytes(model) == 297_600

    p = kbitprep.plan(model)
    assert len(p.casts) == 7
    big = {c.name: c for c in p.casts if c.name in ("model.embed_tokens.weight", "lm_head.weight")}
    assert len(big) == 2
    for c in big.values():
        assert c.shape == (1000, 64) and c.bytes_before == 128_000 and c.bytes_after == 256_000
    assert p.bytes_delta == 256_640
    assert {n: q.dtype for n, q in model.named_parameters()} == dtypes and param_bytes(model) == 297_600

    report = kbitprep.prepare(model)
    assert param_bytes(model) == 554_240
    assert report.bytes_delta == 554_240 - 297_600 == 256_640


def test_keeping_embeddings_and_lm_head_low_costs_640_bytes_and_gives_the_logits_dtype_of_peft(model_root: str) -> None:
    """C02: keep_in_low_precision=(embed_tokens, lm_head) plans 5 casts (the norms) and
    bytes_delta 640; both matrices stay bf16, yet the logits are fp32 as without keep (and as
    with peft, which upcasts lm_head): keep changes storage only (issue 16). The standard LoRA
    step gives a finite loss with 8 LoRA grads, 4 lora_B non-zero."""
    need("bitsandbytes")
    from _quantized import bnb4

    model = bnb4(model_root)
    report = kbitprep.prepare(model, keep_in_low_precision=KEEP_EMBED_AND_HEAD)

    assert sorted(c.name for c in report.casts) == sorted(NORM_NAMES)
    assert report.bytes_delta == 640
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.train()
    assert model(standard_batch(2, 8)).logits.dtype == torch.float32

    loss, grads = standard_step(add_lora(model))
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)


@pytest.mark.slow
def test_large_4bit_model_upcast_cost_is_almost_all_vocabulary_matrices(tmp_path: Any) -> None:
    """C02 (large config: hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 32,000): auto
    upcast adds 65,553,408 bytes; keeping embed_tokens and lm_head low leaves 17 casts (the
    norms) and 17,408 bytes."""
    need("bitsandbytes")
    from _models import tiny_llama
    from _quantized import bnb4_config

    path = tmp_path / "large"
    tiny_llama(  # type: ignore[operator]
        torch.bfloat16,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32_000,
    ).save_pretrained(path)
    model = load(str(path), quantization_config=bnb4_config())

    auto = kbitprep.plan(model)
    low = kbitprep.plan(model, keep_in_low_precision=KEEP_EMBED_AND_HEAD)

    assert auto.bytes_delta == 65_553_408
    assert len(low.casts) == 17 and low.bytes_delta == 17_408


# -- whole kind: no cast costs memory the caller could not see first ---------------------------

POLICIES: dict[str, dict[str, Any]] = {
    "auto": {},
    "all": {"upcast": "all"},
    "none": {"upcast": "none"},
    "norm-only": {"upcast": lambda name, param, module: "norm" in name},
    "auto-keep-lm_head": {"keep_in_low_precision": ("lm_head",)},
    "all-to-bf16": {"upcast": "all", "upcast_dtype": torch.bfloat16},
}


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_plan_bytes_equal_prepare_bytes_equal_measured_change(kind: str, model_root: str) -> None:
    """C01/C02 whole kind: for every backend that runs on CPU and every upcast policy,
    plan().bytes_delta == prepare().bytes_delta == the measured change in parameter bytes, the
    dry run allocates no parameter storage (every data_ptr unchanged), and undo restores the
    original byte count (so the next policy starts from the loaded model)."""
    model = CPU_KINDS[kind](model_root)
    loaded = param_bytes(model)
    for label, options in POLICIES.items():
        ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
        p = kbitprep.plan(model, **options)
        assert {n: q.data_ptr() for n, q in model.named_parameters()} == ptrs, label
        assert param_bytes(model) == loaded, label

        with pytest.warns(kbitprep.KbitPrepWarning) if p.warnings else _no_warning():
            report = kbitprep.prepare(model, **options)
        measured = param_bytes(model) - loaded
        assert p.bytes_delta == report.bytes_delta == measured, (label, p.bytes_delta, report.bytes_delta, measured)
        assert p.casts == report.casts, label
        for c in report.casts:
            assert plan_dtype(report, model, c.name) == dict(model.named_parameters())[c.name].dtype
        report.undo()
        assert param_bytes(model) == loaded, label


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", kbitprep.KbitPrepWarning)

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
