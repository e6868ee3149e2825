"""Every bad input of issue 5 gives a clear KbitPrepError subclass (what was found, how to fix
it) with the model exactly as before, or a correct result."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import kbitprep
from _measure import hook_count, model_state
from _models import tiny_llama
from _quantized import bnb4, plain

REENTRANT = {"use_reentrant": True}


# -- plugin stand-ins (loaded through fake entry points) ------------------------------------------


class DupA(kbitprep.QuantBackend):
    name: ClassVar[str] = "matrix-dup"

    def detect(self, model: Any) -> str | None:
        return None


class DupB(kbitprep.QuantBackend):
    name: ClassVar[str] = "matrix-dup"

    def detect(self, model: Any) -> str | None:
        return None


@contextlib.contextmanager
def fake_plugins(monkeypatch: pytest.MonkeyPatch, *eps: tuple[str, str]) -> Iterator[None]:
    """A fresh registry whose entry points are ``eps`` (name, "module:attr")."""
    from kbitprep import _registry as reg

    points = [EntryPoint(name=n, value=v, group=reg.ENTRY_POINT_GROUP) for n, v in eps]
    monkeypatch.delenv("KBITPREP_DISABLE_PLUGINS", raising=False)
    monkeypatch.setattr(reg, "entry_points", lambda group=None, **_kw: points if group == reg.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(reg, "_registry", reg._Registry())
    yield


def missing_library(monkeypatch: pytest.MonkeyPatch, lib: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *a: Any, **kw: Any) -> Any:
        return None if name == lib or name.startswith(lib + ".") else real(name, *a, **kw)

    from kbitprep import _registry as reg

    monkeypatch.setattr(reg.importlib.util, "find_spec", find_spec)  # type: ignore[attr-defined]


# -- the matrix ---------------------------------------------------------------------------------


@dataclass
class Bad:
    """One bad input: how to build the model, how to call kbitprep, and what must come out."""

    build: Callable[[str, pytest.MonkeyPatch], Any]
    call: Callable[[Any], Any]
    error: type[Exception] | None = None
    says: tuple[str, ...] = ()  # substrings of the message: what was found and how to fix it
    warns: tuple[type[kbitprep.KbitPrepWarning], str] | None = None  # a warning of this kind whose text contains this
    check: Callable[[Any, Any], None] | None = None  # on success: (result, model)
    extra: dict[str, Any] = field(default_factory=dict)


def _bnb4(root: str, mp: pytest.MonkeyPatch) -> Any:
    return bnb4(root)


def _plain(root: str, mp: pytest.MonkeyPatch) -> Any:
    return plain(root)


def _meta(root: str, mp: pytest.MonkeyPatch) -> Any:
    with torch.device("meta"):
        return tiny_llama()


def _mixed_cpu_meta(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = plain(root)
    model.lm_head.to("meta")
    return model


def _peft(root: str, mp: pytest.MonkeyPatch) -> Any:
    from _lora import add_lora

    return add_lora(bnb4(root))


def _adapters_injected(root: str, mp: pytest.MonkeyPatch) -> Any:
    from peft import LoraConfig, inject_adapter_in_model

    model = bnb4(root)
    return inject_adapter_in_model(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), model)


def _prepared(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = bnb4(root)
    kbitprep.prepare(model)
    return model


def _unknown_method(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = plain(root)
    model.config.quantization_config = {"quant_method": "sparsegpt", "bits": 2}
    # storage behind the label (an int8 buffer): a label alone would read as dequantized (C19)
    model.model.layers[0].mlp.down_proj.register_buffer("qweight", torch.zeros(8, dtype=torch.int8))
    return model


class _StubQuantizer:
    is_trainable = False

    class quantization_config:  # noqa: N801 - mimics transformers' attribute
        quant_method = "bitsandbytes"


def _untrainable(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = bnb4(root)
    model.hf_quantizer = _StubQuantizer()
    return model


def _torchao_missing(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = plain(root)
    model.config.quantization_config = {"quant_method": "torchao"}
    missing_library(mp, "torchao")
    return model


def _hqq_missing(root: str, mp: pytest.MonkeyPatch) -> Any:
    missing_library(mp, "hqq")
    return bnb4(root)


def _broken_plugin(root: str, mp: pytest.MonkeyPatch) -> Any:
    stack = contextlib.ExitStack()
    stack.enter_context(fake_plugins(mp, ("matrix-broken", "kbitprep_no_such_plugin_module:Backend")))
    return bnb4(root)


def _two_plugins(root: str, mp: pytest.MonkeyPatch) -> Any:
    stack = contextlib.ExitStack()
    stack.enter_context(
        fake_plugins(mp, ("matrix-dup", "test_bad_input_matrix:DupA"), ("matrix-dup-2", "test_bad_input_matrix:DupB"))
    )
    return bnb4(root)


def _raising_embeddings(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = bnb4(root)

    def boom() -> Any:
        raise NotImplementedError("custom code")

    model.get_input_embeddings = boom
    model.model.get_input_embeddings = boom
    return model


def _missing_embeddings(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = bnb4(root)

    def gone(self: Any) -> Any:
        raise AttributeError("get_input_embeddings")

    for m in (model, model.model):
        m.__class__ = type(f"No{type(m).__name__}", (type(m),), {"get_input_embeddings": property(gone)})
    return model


class _Toy(nn.Module):
    """A quantized-looking model with no checkpointing switch at all."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.is_quantized = True
        self.quantization_method = "quanto"
        # storage behind the label (an int8 buffer): a label alone would read as dequantized (C19)
        self.proj.register_buffer("qweight", torch.zeros(8, dtype=torch.int8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))  # type: ignore[no-any-return]


def _no_checkpointing(root: str, mp: pytest.MonkeyPatch) -> Any:
    return _Toy().to(torch.bfloat16)


def _checkpointing_unsupported(root: str, mp: pytest.MonkeyPatch) -> Any:
    model = bnb4(root)
    model.supports_gradient_checkpointing = False
    return model


def _check_peft(report: Any, model: Any) -> None:
    assert report.backend == "bitsandbytes"
    assert len(report.kept_trainable) == 8 and report.frozen == 21
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def _check_injected(report: Any, model: Any) -> None:
    assert len(report.kept_trainable) == 8
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def _check_prepared_again(report: Any, model: Any) -> None:
    assert report.casts == () and report.bytes_delta == 0


def _check_generic(report: Any, model: Any) -> None:
    assert report.backend == "generic" and report.casts == ()


def _check_dequantized_torchao(report: Any, model: Any) -> None:
    # a torchao label with no storage behind it: unquantized (issue 12), no torchao call needed
    assert report.backend == "none"
    assert "'torchao'" in report.reason and "dequantized" in report.reason


def _check_forced_hqq(report: Any, model: Any) -> None:
    # hqq's policy needs no hqq call on this model, so the missing library stops nothing (issue 12)
    assert report.backend == "hqq" and report.casts == ()


def _check_hook_on_embed(report: Any, model: Any) -> None:
    assert report.input_grad_hook is True and hook_count(model.model.embed_tokens) == 1


def _check_checkpointing_off(report: Any, model: Any) -> None:
    assert report.gradient_checkpointing is False and report.use_reentrant is None


def _check_bnb(report: Any, model: Any) -> None:
    assert report.backend == "bitsandbytes" and len(report.casts) == 7


def _broken_status(report: Any, model: Any) -> None:
    _check_bnb(report, model)
    status = kbitprep.available_backends()["matrix-broken"].status
    assert status.startswith("broken:") and "kbitprep_no_such_plugin_module" in status


def _duplicate_status(report: Any, model: Any) -> None:
    _check_bnb(report, model)
    infos = kbitprep.available_backends()
    assert infos["matrix-dup"].status == "ok"
    broken = [i for i in infos.values() if i.status.startswith("broken:") and "matrix-dup" in i.status]
    assert broken and "DuplicateBackendError" in broken[0].status
    with pytest.raises(kbitprep.DuplicateBackendError, match="replace=True"):
        kbitprep.register_backend(DupB)


P = kbitprep.prepare
BAD: dict[str, Bad] = {
    "not an nn.Module": Bad(
        lambda r, mp: "meta-llama/Llama-2-7b-hf", P, kbitprep.InvalidModelError, ("got str", "Pass the model")
    ),
    "meta-device parameters": Bad(_meta, P, kbitprep.InvalidModelError, ("meta device", "Load the weights")),
    "parameters on mixed devices (cpu + meta)": Bad(
        _mixed_cpu_meta, P, kbitprep.InvalidModelError, ("'lm_head.weight'", "meta device", "Load the weights")
    ),
    "a PeftModel (looked through)": Bad(
        _peft, P, warns=(kbitprep.AdapterWarning, "already attached"), check=_check_peft
    ),
    "already prepared": Bad(_prepared, P, check=_check_prepared_again),
    "adapters attached before prepare": Bad(
        _adapters_injected, P, warns=(kbitprep.AdapterWarning, "usual order"), check=_check_injected
    ),
    "unknown quantization method": Bad(
        _unknown_method, P, warns=(kbitprep.BackendWarning, "'sparsegpt'"), check=_check_generic
    ),
    "unknown backend name": Bad(
        _plain,
        lambda m: P(m, backend="sparsegpt"),
        kbitprep.UnknownBackendError,
        ("'sparsegpt'", "'bitsandbytes'", "backend='auto'"),
    ),
    "a quantizer that is not trainable": Bad(
        _untrainable,
        P,
        kbitprep.NotTrainableError,
        ("is_trainable is False", "quantization config that supports training"),
    ),
    "the backend's library missing (detected)": Bad(
        _torchao_missing,
        P,
        warns=(kbitprep.MemoryWarning, "The model is not quantized"),
        check=_check_dequantized_torchao,
    ),
    "the backend's library missing (asked for)": Bad(
        _hqq_missing,
        lambda m: P(m, backend="hqq"),
        warns=(kbitprep.DetectionWarning, "backend='hqq' was passed"),
        check=_check_forced_hqq,
    ),
    "a broken plugin": Bad(_broken_plugin, P, check=_broken_status),
    "two plugins with one name": Bad(_two_plugins, P, check=_duplicate_status),
    "get_input_embeddings raising": Bad(
        _raising_embeddings, lambda m: P(m, gradient_checkpointing_kwargs=REENTRANT), check=_check_hook_on_embed
    ),
    "get_input_embeddings missing": Bad(
        _missing_embeddings, lambda m: P(m, gradient_checkpointing_kwargs=REENTRANT), check=_check_hook_on_embed
    ),
    "no checkpointing support (no switch)": Bad(
        _no_checkpointing,
        P,
        warns=(kbitprep.CheckpointingWarning, "no gradient checkpointing switch"),
        check=_check_checkpointing_off,
    ),
    "no checkpointing support (supports_gradient_checkpointing False)": Bad(
        _checkpointing_unsupported,
        P,
        warns=(kbitprep.CheckpointingWarning, "no gradient checkpointing switch"),
        check=_check_checkpointing_off,
    ),
    "gradient_checkpointing_kwargs of the wrong type": Bad(
        _bnb4,
        lambda m: P(m, gradient_checkpointing_kwargs=[("use_reentrant", True)]),  # type: ignore[arg-type]
        kbitprep.InvalidArgumentError,
        ("got list", "must be a dict", "{'use_reentrant': False}"),
    ),
    "gradient_checkpointing_kwargs with unknown keys": Bad(
        _bnb4,
        lambda m: P(m, gradient_checkpointing_kwargs={"use_reentrnt": True}),
        kbitprep.InvalidArgumentError,
        ("'use_reentrnt'", "use_reentrant", "Remove or rename"),
    ),
    "gradient_checkpointing_kwargs use_reentrant not a bool": Bad(
        _bnb4,
        lambda m: P(m, gradient_checkpointing_kwargs={"use_reentrant": "yes"}),
        kbitprep.InvalidArgumentError,
        ("'yes'", "True or False"),
    ),
    "gradient_checkpointing_kwargs determinism_check unknown": Bad(
        _bnb4,
        lambda m: P(m, gradient_checkpointing_kwargs={"determinism_check": "bogus"}),
        kbitprep.InvalidArgumentError,
        ("'bogus'", "'default' or 'none'", "determinism_check"),
    ),
    "gradient_checkpointing_kwargs context_fn not callable": Bad(
        _bnb4,
        lambda m: P(m, gradient_checkpointing_kwargs={"context_fn": 5}),
        kbitprep.InvalidArgumentError,
        ("context_fn", "callable", "got 5"),
    ),
    "gradient_checkpointing_kwargs preserve_rng_state not a bool": Bad(
        _bnb4,
        lambda m: P(m, gradient_checkpointing_kwargs={"preserve_rng_state": "x"}),
        kbitprep.InvalidArgumentError,
        ("preserve_rng_state", "True or False", "'x'"),
    ),
    "upcast_dtype not a floating dtype": Bad(
        _bnb4, lambda m: P(m, upcast_dtype=torch.int8), kbitprep.InvalidArgumentError, ("torch.int8", "torch.float32")
    ),
    "upcast_dtype a string": Bad(
        _bnb4,
        lambda m: P(m, upcast_dtype="float32"),  # type: ignore[arg-type]
        kbitprep.InvalidArgumentError,
        ("'float32'", "torch.float32"),
    ),
    "upcast not a policy": Bad(
        _bnb4,
        lambda m: P(m, upcast="most"),
        kbitprep.InvalidArgumentError,
        ("'most'", "'auto', 'all', 'none' or a callable"),
    ),
    "use_gradient_checkpointing not a bool": Bad(
        _bnb4,
        lambda m: P(m, use_gradient_checkpointing="yes"),  # type: ignore[arg-type]
        kbitprep.InvalidArgumentError,
        ("'yes'", "True or False"),
    ),
    "keep_in_low_precision not a sequence of names": Bad(
        _bnb4,
        lambda m: P(m, keep_in_low_precision=5),  # type: ignore[arg-type]
        kbitprep.InvalidArgumentError,
        ("got 5", "('lm_head',)"),
    ),
    # issue 16: a pattern that matches nothing is an error (peft's target_modules convention),
    # not a warning followed by the full upcast the pattern was meant to avoid
    "keep_in_low_precision pattern that matches nothing": Bad(
        _bnb4,
        lambda m: P(m, keep_in_low_precision=("lm_haed",)),
        kbitprep.InvalidArgumentError,
        ("'lm_haed'", "closest names: 'lm_head'", "dotted suffix"),
    ),
    "keep_in_low_precision as a comma string": Bad(
        _bnb4,
        lambda m: P(m, keep_in_low_precision="lm_head,embed_tokens"),
        kbitprep.InvalidArgumentError,
        ("regular expression 'lm_head,embed_tokens'", "keep_in_low_precision=('lm_head', 'embed_tokens')"),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_a_clear_error_or_a_correct_result(
    case: str, model_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5, bad input and faults: each input above either raises the listed KbitPrepError
    subclass, whose message names what was found and how to fix it, with the model exactly as
    before (parameters, dtypes, requires_grad, data, hooks, checkpointing, use_cache); or gives
    the correct result (checked per case), with the listed KbitPrepWarning where one is due."""
    bad = BAD[case]
    model = bad.build(model_root, monkeypatch)
    before = model_state(model) if isinstance(model, nn.Module) and case != "meta-device parameters" else None
    if bad.error is not None:
        with pytest.raises(bad.error) as info:
            bad.call(model)
        assert isinstance(info.value, kbitprep.KbitPrepError)
        for part in bad.says:
            assert part in str(info.value), (part, str(info.value))
        if isinstance(info.value, kbitprep.BackendUnavailableError):
            assert info.value.install_hint.startswith("pip install")
        if before is not None:
            assert model_state(model) == before
        return
    if bad.warns is not None:
        category, text = bad.warns
        with pytest.warns(kbitprep.KbitPrepWarning) as record:
            result = bad.call(model)
        seen = [(w.category, str(w.message)) for w in record]
        assert any(c is category and text in t for c, t in seen), seen
    else:
        with contextlib.ExitStack():
            p = kbitprep.plan(model) if case != "already prepared" else None
            if p is not None and p.warnings:
                with pytest.warns(kbitprep.KbitPrepWarning):
                    result = bad.call(model)
            else:
                result = bad.call(model)
    if case == "already prepared":
        assert model_state(model) == before
    assert bad.check is not None
    bad.check(result, model)


@pytest.mark.gpu
def test_parameters_on_mixed_devices_are_cast_where_they_are(model_root: str) -> None:
    """Issue 5, mixed devices: lm_head on CUDA, the rest on CPU: each parameter is cast on its
    own device, the byte figures add up, and undo restores both."""
    model = bnb4(model_root)
    model.lm_head.to("cuda")
    report = kbitprep.prepare(model, use_gradient_checkpointing=False)
    assert model.lm_head.weight.device.type == "cuda" and model.lm_head.weight.dtype == torch.float32
    assert model.model.norm.weight.device.type == "cpu" and report.bytes_delta == 256_640
    report.undo()
    assert model.lm_head.weight.dtype == torch.bfloat16
