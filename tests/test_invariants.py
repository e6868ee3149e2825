"""The promise of ``keep_in_low_precision`` over the architecture matrix (issue 16).

``keep_in_low_precision`` changes storage only: for any options O, ``prepare(model, **O,
keep_in_low_precision=K)`` trains exactly like ``prepare(model, **O)`` — the same logits dtype,
a bit-identical step-1 loss, bit-identical adapter gradients, and (after one AdamW step) a
bit-identical step-2 loss — while the parameters under the kept modules stay in the dtype they
were loaded in. Every trainable parameter (LoRA, a ``modules_to_save`` copy of a kept module) is
stored at ``upcast_dtype`` once training starts, unless ``upcast="none"`` asked for the stored
dtypes.

The matrix (tests/_matrix.py): Llama, Qwen2 and Gemma2 (tied), T5, a Llava-style VLM, Whisper and
a sequence classifier × bitsandbytes nf4 with fp32 / bf16 compute, LLM.int8 on fp16, unquantized
bf16. Every architecture × quantization runs with the head and embeddings kept under the
defaults; hypothesis draws the rest (options, a whole kept subtree, ``modules_to_save`` with and
without ``ensure_weight_tying``); ``nox -s fuzz`` draws many more. The whole-subtree keeps that do
not hold yet are listed in ``KNOWN_GAPS`` with their reason and run as strict xfails.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kbitprep  # noqa: E402
from _matrix import ARCHS, QUANTS, load_matrix_model  # noqa: E402
from _models import transformers_major  # noqa: E402

TRANSFORMERS5 = transformers_major() >= 5

TIED = ("qwen2", "gemma2")
FEATURES = ("input_features", "pixel_values")  # the one floating input of Whisper / Llava
OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "upcast-none": {"upcast": "none"},
    "trainable-blocks-only": {"checkpoint_trainable_blocks_only": True},
    "bf16-upcast": {"upcast_dtype": torch.bfloat16},
}
# the default run draws this many combinations; the fuzz profile (nox -s fuzz) its own, larger number
EXAMPLES = 12 if settings.default.max_examples <= 40 else settings.default.max_examples


@dataclass
class Outcome:
    """What one prepared-and-trained model gave."""

    loss1: torch.Tensor
    loss2: torch.Tensor
    logits_dtype: torch.dtype
    grads: dict[str, torch.Tensor | None]
    dtypes: dict[str, torch.dtype]
    numel: dict[str, int]
    names: dict[str, tuple[str, ...]]
    trainable: dict[str, torch.dtype]
    bytes_delta: int


def _features_dtype(report: kbitprep.PreparationReport, loaded: torch.dtype) -> torch.dtype:
    """The floating input (audio features, pixel values) arrives in the checkpoint dtype (what a
    feature extractor gives for it), unless the plan says the model now needs another dtype for
    it and adds no cast."""
    for item in report.model_inputs:
        if item.name in FEATURES and not item.cast:
            return item.dtype
    return loaded


def _lora_config(arch: str, adapter: str) -> Any:
    from peft import LoraConfig

    a = ARCHS[arch]
    extra: dict[str, Any] = {}
    if adapter == "modules_to_save":
        extra["modules_to_save"] = [a.head]
    elif adapter == "tied_modules_to_save":
        extra.update(modules_to_save=list(a.head_and_embeddings), ensure_weight_tying=True)
    return LoraConfig(r=4, lora_alpha=8, target_modules=list(a.lora_targets), lora_dropout=0.0, **extra)


def _train(root: str, arch: str, quant: str, adapter: str, **options: Any) -> Outcome:
    from peft import get_peft_model

    torch.manual_seed(0)
    model = load_matrix_model(root, arch, quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        report = kbitprep.prepare(model, **options)
    torch.manual_seed(0)  # the same LoRA initialisation in both runs
    peft_model = get_peft_model(model, _lora_config(arch, adapter))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)  # built before the first forward, as Trainer does
    batch = ARCHS[arch].batch(_features_dtype(report, QUANTS[quant][0]))
    peft_model.train()
    out = peft_model(**batch)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer.step()
    optimizer.zero_grad()
    loss2 = peft_model(**batch).loss.detach()
    return Outcome(
        loss1=out.loss.detach(),
        loss2=loss2,
        logits_dtype=out.logits.dtype,
        grads=grads,
        dtypes={n: p.dtype for n, p in peft_model.named_parameters()},
        numel={n: p.numel() for n, p in peft_model.named_parameters()},
        names=_all_names(peft_model),
        trainable={n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad},
        bytes_delta=report.bytes_delta,
    )


def _all_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each parameter's first name -> every name it has (a tied parameter has several)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {names[0]: tuple(names) for names in by_id.values()}


def _under(names: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Whether a parameter known by ``names`` lies under a module a pattern names (exact name or
    dotted suffix of a module name, peft's ``target_modules`` convention for a sequence)."""
    for name in names:
        parts = name.split(".")
        modules = [".".join(parts[:i]) for i in range(1, len(parts))]
        if any(m == p or m.endswith("." + p) for m in modules for p in patterns):
            return True
    return False


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical values (NaN equal to NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _check(root: str, arch: str, quant: str, keep: tuple[str, ...], adapter: str, options: dict[str, Any]) -> None:
    plain = _train(root, arch, quant, adapter, **options)
    kept = _train(root, arch, quant, adapter, keep_in_low_precision=keep, **options)
    loaded = QUANTS[quant][0]
    upcast_dtype = options.get("upcast_dtype", torch.float32)

    # the numerics are those of the same call without keep, to the bit
    assert kept.logits_dtype == plain.logits_dtype
    _same(kept.loss1, plain.loss1)
    assert kept.grads.keys() == plain.grads.keys()
    for name, grad in plain.grads.items():
        other = kept.grads[name]
        assert (grad is None) == (other is None), name
        if grad is not None and other is not None:
            assert torch.equal(grad.to(other.dtype), other) or torch.equal(grad, other.to(grad.dtype)), name
    # upcast="none" trains an fp16 modules_to_save copy in fp16, as asked: AdamW's step can make it
    # NaN, and then it must be NaN in both runs
    _same(kept.loss2, plain.loss2)

    # only the storage of the kept modules' frozen floating parameters changes, and the persistent
    # bytes go down by exactly what keeping them low saves
    saved = 0
    for name, dtype in plain.dtypes.items():
        if name in plain.trainable or not _under(plain.names[name], keep) or not dtype.is_floating_point:
            assert kept.dtypes[name] == dtype, name
        else:
            assert kept.dtypes[name] in (dtype, loaded), name
            numel = plain.numel[name]
            saved += numel * (dtype.itemsize - kept.dtypes[name].itemsize)
    assert kept.bytes_delta == plain.bytes_delta - saved

    # a trainable parameter is stored at upcast_dtype unless upcast="none" asked for the stored dtypes
    if options.get("upcast") != "none":
        low = {n: d for n, d in kept.trainable.items() if torch.finfo(d).bits < torch.finfo(upcast_dtype).bits}
        assert not low, low


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_keeping_head_and_embeddings_changes_storage_only(arch: str, quant: str, model_root: str) -> None:
    _check(model_root, arch, quant, ARCHS[arch].head_and_embeddings, "lora", {})


# Whole-subtree keeps the library cannot make bit-identical yet, each for a reason outside the
# kept modules' own forward (documented in docs/plan-report-undo.md, "Known limits of keep"):
# - LoRA on a kept unquantized layer: peft initialises a new adapter and rounds it to the base
#   weight's stored dtype (bf16) before kbitprep stores it at upcast_dtype, so its starting values
#   differ from the run without keep;
# - T5's encoder: T5's feed-forward casts its input to the dtype of its child ``wo`` weight, so a
#   kept ``wo`` rounds the activations to bf16 before ``wo`` computes in fp32.
PEFT_INIT = "peft initialises a LoRA adapter on a kept unquantized layer in the layer's stored dtype"
PARENT_READS_CHILD = "T5's feed-forward casts its input to its kept child's stored dtype"
KNOWN_GAPS: dict[tuple[str, str], str] = {
    **{(arch, "bf16"): PEFT_INIT for arch in ("llama", "qwen2", "llava", "whisper", "classifier")},
    # on transformers 4.57 the nf4 T5 encoder keep holds (seen in the tests_transformers4 session)
    **{
        ("t5", quant): PARENT_READS_CHILD
        for quant in ("nf4-fp32", "nf4-bf16", "bf16")
        if TRANSFORMERS5 or quant == "bf16"
    },
}


@pytest.mark.parametrize(
    ("arch", "quant"),
    [
        pytest.param(a, q, marks=pytest.mark.xfail(strict=True, reason=why), id=f"{a}-{q}")
        for (a, q), why in KNOWN_GAPS.items()
    ],
)
def test_known_gaps_of_subtree_keeps_still_differ(arch: str, quant: str, model_root: str) -> None:
    """Strict xfails: when one of these starts to hold, the gap list above must shrink."""
    _check(model_root, arch, quant, ARCHS[arch].subtree, "lora", {})


@settings(max_examples=EXAMPLES)
@given(
    arch=st.sampled_from(list(ARCHS)),
    quant=st.sampled_from(list(QUANTS)),
    subtree=st.booleans(),
    adapter=st.sampled_from(["lora", "modules_to_save", "tied_modules_to_save"]),
    options=st.sampled_from(list(OPTIONS)),
)
@pytest.mark.slow
def test_keep_changes_storage_only_for_any_options(
    arch: str, quant: str, subtree: bool, adapter: str, options: str, model_root: str
) -> None:
    if adapter == "tied_modules_to_save" and arch not in TIED:
        adapter = "modules_to_save"
    if subtree and (arch, quant) in KNOWN_GAPS:
        subtree = False  # a known gap, checked on its own above
    a = ARCHS[arch]
    note(f"{arch} {quant} subtree={subtree} adapter={adapter} options={options}")
    _check(model_root, arch, quant, a.subtree if subtree else a.head_and_embeddings, adapter, OPTIONS[options])


def test_the_matrix_loads_what_it_names(model_root: str) -> None:
    """The matrix is what it says: nf4 and LLM.int8 models hold bitsandbytes layers, the bf16
    one none, and the tied architectures share one embedding matrix with their head."""
    import bitsandbytes as bnb

    for quant, cls in (("nf4-bf16", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt), ("bf16", None)):
        model = load_matrix_model(model_root, "qwen2", quant)
        found = [m for m in model.modules() if cls is not None and isinstance(m, cls)]
        assert bool(found) == (cls is not None), quant
        head: Any = model.get_output_embeddings()
        assert isinstance(head, nn.Module)
        assert head.weight is model.get_input_embeddings().weight


def test_keep_is_bit_identical_for_a_real_sized_vocabulary(model_root: str) -> None:
    """The kept lm_head's input gradient is one product over the whole weight, as autograd's for
    a Linear stored at the compute dtype: with more output rows than any chunk size (here 9000,
    over the 8192-row chunks an earlier version summed), LoRA gradients stay bit-identical."""
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from _models import load, tiny_llama
    from _quantized import bnb4_config

    path = Path(model_root) / "tiny-vocab9000"
    if not (path / "config.json").exists():
        tiny_llama(torch.bfloat16, vocab_size=9000).save_pretrained(path)  # type: ignore[operator]
    grads = []
    for keep in ((), ("lm_head",)):
        model = load(str(path), quantization_config=bnb4_config(bnb_4bit_compute_dtype=torch.float32))
        kbitprep.prepare(model, keep_in_low_precision=keep)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        peft_model.train()
        ids = torch.randint(0, 9000, (2, 16), generator=torch.Generator().manual_seed(0))
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and torch.equal(grad, grads[1][name]), name
