"""Bad input (issue 2 subset): each a KbitPrepError subclass whose message says what to do, and
the model untouched (dtypes, requires_grad, hooks, checkpointing, use_cache)."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _models import load, saved_tiny, tiny_llama
from _plan_warnings import emitted_of
from _quantized import bnb4_config
from kbitprep import (
    InvalidArgumentError,
    InvalidModelError,
    KbitPrepError,
    NotTrainableError,
    UnknownBackendError,
)

ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "plan": kbitprep.plan,
    "prepare": kbitprep.prepare,
    "drop-in": kbitprep.prepare_model_for_kbit_training,
}


def _state(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "params": {n: (p.dtype, p.requires_grad, p.device.type, p.data_ptr()) for n, p in model.named_parameters()},
        "hooks": {
            n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "checkpointing": {
            n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
        },
        "use_cache": getattr(config, "use_cache", None),
        "attrs": sorted(vars(model)),
    }


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("thing", ["meta-llama/Llama-3-8B", {"model.embed_tokens.weight": torch.zeros(2)}, None])
def test_not_a_module(entry: str, thing: object) -> None:
    with pytest.raises(InvalidModelError) as info:
        ENTRY_POINTS[entry](thing)
    assert isinstance(info.value, KbitPrepError) and isinstance(info.value, TypeError)
    assert "nn.Module" in str(info.value) and "Pass the model object" in str(info.value)


def test_detect_backend_not_a_module() -> None:
    with pytest.raises(InvalidModelError, match="torch.nn.Module"):
        kbitprep.detect_backend("a path")  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kwargs", [["use_reentrant", False], "use_reentrant=False", 0, True])
def test_checkpointing_kwargs_not_a_mapping(entry: str, kwargs: object) -> None:
    model = tiny_llama(torch.bfloat16)
    before = _state(model)
    with pytest.raises(InvalidArgumentError) as info:
        ENTRY_POINTS[entry](model, True, kwargs)
    assert isinstance(info.value, KbitPrepError) and isinstance(info.value, TypeError)
    assert "gradient_checkpointing_kwargs must be a dict" in str(info.value)
    assert "{'use_reentrant': False}" in str(info.value)  # shows the form to pass
    assert _state(model) == before


@pytest.mark.parametrize("entry", ["prepare", "drop-in"])
def test_meta_device_model_is_refused_by_prepare(entry: str) -> None:
    with torch.device("meta"):
        model = tiny_llama(torch.bfloat16)
    before = _state(model)
    with pytest.raises(InvalidModelError) as info:
        ENTRY_POINTS[entry](model)
    message = str(info.value)
    assert "meta device" in message and "Load the weights first" in message
    assert _state(model) == before


def test_partly_meta_model_is_refused_before_anything_changes() -> None:
    """An offloaded-looking model: one parameter on meta, the rest real. Nothing may change."""
    model = tiny_llama(torch.bfloat16)
    model.lm_head.weight = nn.Parameter(torch.empty(1000, 64, dtype=torch.bfloat16, device="meta"))
    before = _state(model)
    with pytest.raises(InvalidModelError, match="'lm_head.weight'"):
        kbitprep.prepare(model)
    assert _state(model) == before


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_backend_name(entry: str) -> None:
    model = tiny_llama(torch.bfloat16)
    before = _state(model)
    with pytest.raises(UnknownBackendError) as info:
        ENTRY_POINTS[entry](model, backend="nope")
    assert isinstance(info.value, LookupError)
    message = str(info.value)
    assert "'nope'" in message and "Known backends:" in message
    for known in ("'bitsandbytes'", "'torchao'", "'none'"):
        assert known in message
    assert "backend='auto'" in message
    assert _state(model) == before


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_backend_library_not_installed_stops_nothing_it_does_not_call(
    entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forced strategy whose library is missing still prepares a model when none of its steps
    calls the library (issue 12): no BackendUnavailableError, the forced-backend note instead."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name.split(".")[0] == "torchao" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    model = tiny_llama(torch.bfloat16)
    assert kbitprep.plan(model, backend="torchao").backend == "torchao"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ENTRY_POINTS[entry](model, backend="torchao")
    assert entry == "plan" or emitted_of(seen, kbitprep.DetectionWarning, "backend='torchao' was passed")
    assert entry == "plan" or not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # torchao's policy casts nothing


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_quantizer_not_trainable(entry: str, model_root: str) -> None:
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    quantizer = model.hf_quantizer

    class NotTrainableQuantizer(type(quantizer)):  # type: ignore[misc]
        @property
        def is_trainable(self) -> bool:
            return False

    quantizer.__class__ = NotTrainableQuantizer
    before = _state(model)
    with pytest.raises(NotTrainableError) as info:
        ENTRY_POINTS[entry](model)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KbitPrepError)
    message = str(info.value)
    assert "is_trainable is False" in message and "NotTrainableQuantizer" in message
    assert "Load the model with a quantization config that supports training" in message
    assert _state(model) == before


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("policy", "match", "cause"),
    [
        (lambda n, p, m: "no", r"returned 'no' \(str\) for parameter 'model.embed_tokens.weight'", None),
        (lambda n, p, m: 1 / 0, r"raised ZeroDivisionError: division by zero for parameter", ZeroDivisionError),
    ],
    ids=["returns-a-string", "raises"],
)
def test_a_bad_upcast_callable_is_refused_and_nothing_changes(
    entry: str, policy: Callable[..., object], match: str, cause: type[BaseException] | None
) -> None:
    """A callable upcast must answer True or False: "no" would read as True and cast everything,
    and its own exception would surface bare. Both are an InvalidArgumentError naming the first
    parameter asked about, raised while planning, so the model is unchanged."""
    model = tiny_llama(torch.bfloat16)
    before = _state(model)
    with pytest.raises(InvalidArgumentError, match=match) as info:
        ENTRY_POINTS[entry](model, upcast=policy)
    assert type(info.value.__cause__) is cause if cause else info.value.__cause__ is None
    assert _state(model) == before


def test_an_upcast_callable_may_answer_with_a_bool_tensor() -> None:
    """``p.dtype == torch.bfloat16`` is a bool, ``p.abs().sum() > 0`` a 0-d bool tensor: both are answers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        p = kbitprep.plan(tiny_llama(torch.bfloat16), upcast=lambda n, p, m: p.abs().sum() > 0)
    assert len(p.casts) == 21


def test_keep_in_low_precision_is_read_once_so_a_generator_keeps_what_a_tuple_keeps(model_root: str) -> None:
    """Any iterable of names is read once: a generator keeps exactly what the tuple keeps (5 of
    the 7 casts of the nf4 Llama are left: embed_tokens and lm_head are not cast), a typo in an
    iterator is refused with the closest name, and a mapping is refused rather than read as
    its keys."""
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    names = ("lm_head", "embed_tokens")
    as_tuple = kbitprep.plan(model, keep_in_low_precision=names)
    as_generator = kbitprep.plan(model, keep_in_low_precision=(n for n in names))
    assert len(kbitprep.plan(model).casts) == 7 and len(as_tuple.casts) == 5
    assert as_generator.to_dict() == as_tuple.to_dict()
    with pytest.raises(InvalidArgumentError, match="lm_head"):
        kbitprep.plan(model, keep_in_low_precision=iter(["lm_haed"]))
    for bad in ({"lm_head": 1}, b"lm_head"):
        with pytest.raises(InvalidArgumentError, match="keep_in_low_precision must be a sequence"):
            kbitprep.plan(model, keep_in_low_precision=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_keywords_are_refused_with_the_known_ones_before_anything_changes(entry: str, model_root: str) -> None:
    """A misspelt option is an InvalidArgumentError listing every option, the two peft
    positionals included; ``use_reentrant`` passed at the top level (as transformers'
    ``gradient_checkpointing_enable`` users write it) says where it goes."""
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    before = _state(model)
    with pytest.raises(InvalidArgumentError, match=r"\['upcst'\].*gradient_checkpointing_kwargs.*'upcast'"):
        ENTRY_POINTS[entry](model, upcst="all")
    with pytest.raises(InvalidArgumentError, match=r"gradient_checkpointing_kwargs=\{'use_reentrant': False\}"):
        ENTRY_POINTS[entry](model, use_reentrant=False)
    assert _state(model) == before
