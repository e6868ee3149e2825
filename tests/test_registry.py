"""Backend registry: plugins through real entry points, runtime registration, priorities,
unknown and unavailable backends, and detection in every tier (issue 2).

The plugin tests need the two fixture distributions under tests/plugins installed (nox's
``tests`` session does it; by hand: ``pip install --no-deps -e tests/plugins/goodplugin
-e tests/plugins/brokenplugin``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora
from _models import load, saved_tiny, tiny_llama, transformers_major
from _plan_warnings import warning_of
from _quantized import bnb4_config
from kbitprep import (
    BackendUnavailableError,
    DuplicateBackendError,
    KbitPrepError,
    QuantBackend,
    UnknownBackendError,
)
from kbitprep.backends.base import count_reason, found_reason, modules_of_type

GOOD_DIST = "kbitprep-goodplugin"
BROKEN_DIST = "kbitprep-brokenplugin"


def _require_dist(name: str) -> None:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed: pip install --no-deps -e tests/plugins/{name.split('-')[1]}")


# -- plugins ----------------------------------------------------------------------------------


def test_good_plugin_is_found_with_its_distribution_name() -> None:
    _require_dist(GOOD_DIST)
    info = kbitprep.available_backends()["goodquant"]
    assert info.source == GOOD_DIST
    assert info.status == "ok"
    assert info.priority == 5
    backend = kbitprep.get_backend("goodquant")
    assert type(backend).__module__ == "kbitprep_goodplugin"


def test_good_plugin_claims_a_model_it_recognises() -> None:
    _require_dist(GOOD_DIST)
    model = tiny_llama(torch.float32)
    model.goodquant_marker = True
    detection = kbitprep.detect_backend(model)
    assert detection == kbitprep.Detection("goodquant", "model.goodquant_marker is True")
    report = kbitprep.prepare(model)
    assert report.backend == "goodquant"
    assert report.casts == ()  # the base class default: nothing upcast
    assert report.gradient_checkpointing and report.use_reentrant is False
    assert not any(p.requires_grad for p in model.parameters())


def test_good_plugin_outranks_the_generic_fallback_on_its_own_quant_method() -> None:
    _require_dist(GOOD_DIST)
    model = tiny_llama(torch.float32)
    model.config.quantization_config = {"quant_method": "goodquant"}
    # storage behind the label (an int8 buffer): a label alone would read as dequantized (C19)
    model.model.layers[0].mlp.down_proj.register_buffer("qweight", torch.zeros(8, dtype=torch.int8))
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "goodquant"
    assert "goodquant" in detection.reason
    p = kbitprep.plan(model)
    assert p.backend == "goodquant"
    assert not any("generic" in w for w in p.warnings)  # of any kind


def test_broken_plugin_shows_broken_and_bnb_still_prepares(model_root: str) -> None:
    _require_dist(BROKEN_DIST)
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    backends = kbitprep.available_backends()
    broken = backends["brokenquant"]
    assert broken.source == BROKEN_DIST
    assert broken.status.startswith("broken: ")
    assert "not_a_real_quant_lib" in broken.status
    with pytest.raises(UnknownBackendError, match="broken plugin"):
        kbitprep.get_backend("brokenquant")
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    report = kbitprep.prepare(model)
    assert report.backend == "bitsandbytes"
    assert len(report.casts) == 7


def test_plugin_may_not_shadow_a_builtin_name() -> None:
    """The broken distribution's second entry point, named 'bitsandbytes', reuses the built-in
    name: it is listed as broken (not dropped silently) and the built-in keeps the name."""
    _require_dist(BROKEN_DIST)
    backends = kbitprep.available_backends()
    shadow = [info for key, info in backends.items() if key != "bitsandbytes" and key.startswith("bitsandbytes")]
    assert len(shadow) == 1, list(backends)
    assert shadow[0].source == BROKEN_DIST
    assert shadow[0].status.startswith("broken: ") and "bitsandbytes" in shadow[0].status
    assert backends["bitsandbytes"].source == "builtin"
    assert type(kbitprep.get_backend("bitsandbytes")).__module__ == "kbitprep.backends.bitsandbytes"


def _backends_in_subprocess(env_extra: dict[str, str]) -> dict[str, str]:
    code = "import json, kbitprep; print(json.dumps({k: v.source for k, v in kbitprep.available_backends().items()}))"
    env = {k: v for k, v in os.environ.items() if k != "KBITPREP_DISABLE_PLUGINS"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_disable_plugins_env_var_skips_entry_points() -> None:
    _require_dist(GOOD_DIST)
    _require_dist(BROKEN_DIST)
    enabled = _backends_in_subprocess({})
    assert enabled["goodquant"] == GOOD_DIST and "brokenquant" in enabled
    disabled = _backends_in_subprocess({"KBITPREP_DISABLE_PLUGINS": "1"})
    assert "goodquant" not in disabled and "brokenquant" not in disabled
    assert set(disabled.values()) == {"builtin"}
    assert {"bitsandbytes", "torchao", "none", "generic"} <= set(disabled)


def test_disable_plugins_env_var_blocks_named_plugins() -> None:
    """``KBITPREP_DISABLE_PLUGINS`` with names blocks those plugins only, by entry-point name or by
    distribution name (as pluggy's set_blocked): never imported, listed as blocked."""
    _require_dist(GOOD_DIST)
    _require_dist(BROKEN_DIST)
    code = (
        "import json, sys, kbitprep\n"
        "b = kbitprep.available_backends()\n"
        "print(json.dumps({'status': {k: v.status for k, v in b.items()}, "
        "'imported': sorted(m for m in sys.modules if m.startswith('kbitprep_'))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KBITPREP_DISABLE_PLUGINS"}
    env["KBITPREP_DISABLE_PLUGINS"] = f"goodquant, {BROKEN_DIST}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    status, imported = data["status"], data["imported"]
    assert status["goodquant"] == "blocked: KBITPREP_DISABLE_PLUGINS"
    assert status["brokenquant"] == "blocked: KBITPREP_DISABLE_PLUGINS"  # blocked by its distribution
    assert not any(s.startswith("broken") for s in status.values()), status
    assert imported == [], imported  # a blocked plugin is never imported
    if "toyquant" in status:  # the example plugin, installed by nox, is not named: it loads
        assert status["toyquant"] in ("ok",) or status["toyquant"].startswith("missing"), status["toyquant"]
    assert status["bitsandbytes"] in ("ok",) or status["bitsandbytes"].startswith("missing")
    code = "import kbitprep\ntry:\n    kbitprep.get_backend('goodquant')\nexcept kbitprep.UnknownBackendError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "blocked by KBITPREP_DISABLE_PLUGINS" in out.stdout


def test_every_builtin_strategy_declares_the_library_it_needs() -> None:
    """A strategy for a quantization method names its library in ``requires``, so
    ``available_backends`` cannot say "ok" while it is absent; only the two fallbacks need none."""
    from kbitprep._registry import _registry, builtin_names

    expected = {
        "aqlm": ("aqlm",), "awq": ("gptqmodel",), "bitnet": ("transformers",), "bitsandbytes": ("bitsandbytes",),
        "compressed_tensors": ("compressed_tensors",), "eetq": ("transformers",), "fp8": ("transformers",),
        "gptq": ("gptqmodel",), "hqq": ("hqq",), "mxfp4": ("transformers",), "quanto": ("optimum.quanto",),
        "torchao": ("torchao",), "generic": (), "none": (),
    }  # fmt: skip
    declared = {name: _registry.get_class(name).requires for name in builtin_names()}
    assert declared == expected


def test_contract_is_the_questions_the_orchestrator_asks(clean_registry: None) -> None:
    """The registry checks exactly ``QuantBackend.CONTRACT``; the helpers built on it are not
    contract (a plugin's own ``require(self, a, b)`` is not refused for its signature)."""
    from kbitprep import register_backend

    assert QuantBackend.CONTRACT == (
        "detect", "find_layers", "is_quantized_param", "find_storage", "should_upcast",
        "wants_gradient_checkpointing", "check_trainable", "before_training", "fixup_bytes", "compute_dtype",
        "input_dtype", "plan_warnings", "shardable",
    )  # fmt: skip
    public = {n for n in vars(QuantBackend) if not n.startswith("_") and callable(getattr(QuantBackend, n))}
    assert public - set(QuantBackend.CONTRACT) == {
        "trainable",
        "is_layer",
        "flagged_without_layers",
        "require",
        "missing_requirements",
    }

    class OwnHelper(QuantBackend):
        name = "own-helper-test"

        def detect(self, model: nn.Module) -> str | None:
            return None

        def require(self, purpose: str, extra: str) -> None:  # type: ignore[override,misc]
            return None

    register_backend(OwnHelper)
    assert kbitprep.available_backends()["own-helper-test"].status == "ok"

    class WrongQuestion(QuantBackend):
        name = "wrong-question-test"

        def detect(self, model: nn.Module) -> str | None:
            return None

        def plan_warnings(self) -> list[str]:  # type: ignore[override]
            return []

    with pytest.raises(kbitprep.InvalidArgumentError, match="plan_warnings takes"):
        register_backend(WrongQuestion)


# -- the layer hook and the defaults built on it --------------------------------------------


class _PackedLinear(nn.Linear):
    """A stand-in quantized layer: a float ``scale`` beside its weight, computing in ``act_dtype``."""

    def __init__(self, width: int) -> None:
        super().__init__(width, width)
        self.scale = nn.Parameter(torch.ones(width, dtype=torch.float16))
        self.act_dtype = torch.bfloat16


class _OtherPackedLinear(_PackedLinear):
    pass


class _Layered(QuantBackend):
    """Declares only what the defaults read: no detect, is_quantized_param or input_dtype."""

    name: ClassVar[str] = "layered-test"
    quant_methods: ClassVar[frozenset[str]] = frozenset({"layeredquant"})
    storage_names: ClassVar[frozenset[str]] = frozenset({"weight", "scale"})
    input_dtype_attr: ClassVar[str] = "act_dtype"
    layer_label: ClassVar[str] = "Layered {cls}"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return modules_of_type(model, (_PackedLinear,))


def _layered_model() -> nn.Module:
    return nn.Sequential(
        nn.Embedding(10, 8), _PackedLinear(8), _OtherPackedLinear(8), _PackedLinear(8), nn.Linear(8, 8)
    )


def test_default_detect_reads_quant_methods_then_the_found_layers() -> None:
    """The three tiers of the default detect; the layer count names each class once after one
    "found", as awq, bitnet and quanto always did (bitsandbytes, fp8 and gptq repeated "found")."""
    backend, model = _Layered(), _layered_model()
    assert backend.detect(model) == "found 1 Layered _OtherPackedLinear module, 2 Layered _PackedLinear modules"
    model.quantization_method = "layeredquant"  # type: ignore[assignment]
    assert backend.detect(model) == "model.quantization_method is 'layeredquant'"
    model.config = type("Config", (), {"quantization_config": {"quant_method": "LayeredQuant"}})()  # type: ignore[assignment]
    assert backend.detect(model) == "model.config.quantization_config['quant_method'] is 'layeredquant'"
    assert backend.detect(nn.Sequential(nn.Linear(8, 8))) is None
    assert found_reason(["EetqLinear"] * 14) == count_reason(14, "EetqLinear") == "found 14 EetqLinear modules"
    assert found_reason(["b", "a", "b"], noun="weight") == "found 1 a weight, 2 b weights"
    assert found_reason([]) is None


def test_storage_names_and_input_dtype_attr_apply_to_found_layers_only(clean_registry: None) -> None:
    backend, model = _Layered(), _layered_model()
    layer, plain = model[1], model[4]
    assert backend.is_layer(layer) and backend.is_layer(model[2]) and not backend.is_layer(plain)
    assert not backend.is_layer(model)  # a model holding layers is not one
    assert backend.is_quantized_param("1.scale", layer.scale, layer)
    assert backend.is_quantized_param("1.weight", layer.weight, layer)
    assert not backend.is_quantized_param("1.bias", layer.bias, layer)
    assert not backend.is_quantized_param("4.weight", plain.weight, plain)
    assert backend.input_dtype(layer) == torch.bfloat16 and backend.input_dtype(plain) is None
    assert backend.compute_dtype(model) == torch.bfloat16
    layer.act_dtype = layer.scale  # a floating tensor gives its dtype
    assert backend.input_dtype(layer) == torch.float16
    kbitprep.register_backend(_Layered)
    p = kbitprep.plan(model.to(torch.bfloat16), backend="layered-test", upcast="all", use_gradient_checkpointing=False)
    cast = {c.name for c in p.casts}
    assert "4.weight" in cast and not any(
        n.startswith(("1.", "2.", "3.")) and n.endswith(("weight", "scale")) for n in cast
    )


class _NeitherMethodsNorLayers(QuantBackend):
    name: ClassVar[str] = "neither-test"
    storage_names: ClassVar[frozenset[str]] = frozenset({"scale"})


class _MethodsOnly(QuantBackend):
    name: ClassVar[str] = "methods-only-test"
    quant_methods: ClassVar[frozenset[str]] = frozenset({"methodsonly"})


class _LayersOnly(QuantBackend):
    name: ClassVar[str] = "layers-only-test"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return modules_of_type(model, (_PackedLinear,))


def test_registry_refuses_a_class_the_default_detect_cannot_serve(clean_registry: None) -> None:
    """detect is no longer abstract: a class with neither its own detect, nor quant_methods, nor
    find_layers could claim nothing and is refused as before; either declaration is enough."""
    with pytest.raises(kbitprep.InvalidArgumentError, match=r"does not implement detect\(\) and declares neither"):
        kbitprep.register_backend(_NeitherMethodsNorLayers)
    kbitprep.register_backend(_MethodsOnly)
    kbitprep.register_backend(_LayersOnly)
    assert (
        kbitprep.get_backend("layers-only-test").detect(_layered_model())
        == "found 1 _OtherPackedLinear module, 2 _PackedLinear modules"
    )


@pytest.mark.parametrize(
    ("attr", "value", "message"),
    [
        ("quant_methods", "gptq", "quant_methods must be a frozenset of non-empty strings"),
        ("quant_methods", frozenset({"GPTQ"}), "compared in lower case"),
        ("storage_names", ("weight",), "storage_names must be a frozenset"),
        ("input_dtype_attr", None, "input_dtype_attr must be a string"),
        ("layer_label", 3, "layer_label must be a string"),
        ("upcast_rule", None, "upcast_rule must be a string"),
        ("method_facts", {"gptq": ("storage", "trains")}, "method_facts must map quant_method names to MethodFacts"),
        ("method_facts", "gptq", "method_facts must map quant_method names to MethodFacts"),
    ],
)
def test_registry_refuses_declarations_of_the_wrong_type(
    attr: str, value: object, message: str, clean_registry: None
) -> None:
    cls = type("BadDeclaration", (_MethodsOnly,), {"name": "bad-declaration-test", attr: value})
    with pytest.raises(kbitprep.InvalidArgumentError, match=message):
        kbitprep.register_backend(cls)


def test_unquantized_behaviour_is_declared_by_capabilities(clean_registry: None) -> None:
    """What the none strategy does differently comes from two capabilities, not from its name:
    a plugin strategy declaring them gets the same plan for a plain bf16 model."""
    from kbitprep import register_backend

    class Plain(QuantBackend):
        name = "plain-test"
        holds_storage = False
        keeps_checkpointing_as_found = True

        def detect(self, model: nn.Module) -> str | None:
            return None

        def should_upcast(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
            return param.dtype in (torch.float16, torch.bfloat16)

        def wants_gradient_checkpointing(self, model: nn.Module) -> bool:
            return False

    register_backend(Plain)
    mine = kbitprep.plan(tiny_llama(torch.bfloat16), backend="plain-test")
    none = kbitprep.plan(tiny_llama(torch.bfloat16), backend="none")
    assert not mine.gradient_checkpointing and mine.bytes_delta == none.bytes_delta > 0
    # transformers 4.57 adds a precision note on inputs_embeds to both (see tests/test_warnings.py)
    note = ["precision"] if transformers_major() < 5 else []
    assert sorted(w.kind for w in none.warnings) == sorted(["checkpointing", "memory", *note])
    assert sorted(w.kind for w in mine.warnings) == sorted(["checkpointing", "detection", "memory", *note])
    assert QuantBackend.holds_storage and not QuantBackend.keeps_checkpointing_as_found


# -- runtime registration -------------------------------------------------------------------


def _marker_backend(name: str, priority: int = 0) -> type[QuantBackend]:
    class Marker(QuantBackend):
        def detect(self, model: nn.Module) -> str | None:
            return f"{name} sees model.test_marker" if getattr(model, "test_marker", False) else None

    Marker.name = name  # type: ignore[misc]
    Marker.priority = priority  # type: ignore[misc]
    Marker.__qualname__ = f"Marker_{name}"
    return Marker


def test_register_duplicate_raises_unless_replace(clean_registry: None) -> None:
    first = kbitprep.register_backend(_marker_backend("rt_dup"))
    assert kbitprep.available_backends()["rt_dup"].source == "runtime"
    with pytest.raises(DuplicateBackendError, match="replace=True") as info:
        kbitprep.register_backend(_marker_backend("rt_dup"))
    assert isinstance(info.value, KbitPrepError) and isinstance(info.value, ValueError)
    assert type(kbitprep.get_backend("rt_dup")) is first
    second = kbitprep.register_backend(_marker_backend("rt_dup"), replace=True)
    assert type(kbitprep.get_backend("rt_dup")) is second
    with pytest.raises(DuplicateBackendError):
        kbitprep.register_backend(_marker_backend("bitsandbytes"))


def test_register_backend_as_decorator(clean_registry: None) -> None:
    @kbitprep.register_backend
    class Plain(QuantBackend):
        name: ClassVar[str] = "rt_deco"

        def detect(self, model: nn.Module) -> str | None:
            return None

    @kbitprep.register_backend(replace=True)
    class Replacing(QuantBackend):
        name: ClassVar[str] = "rt_deco"

        def detect(self, model: nn.Module) -> str | None:
            return None

    assert isinstance(Plain, type) and isinstance(Replacing, type)  # the decorator keeps the class
    assert type(kbitprep.get_backend("rt_deco")) is Replacing
    assert kbitprep.available_backends()["rt_deco"].source == "runtime"


def test_priority_decides_between_two_claims_and_plan_names_the_loser(clean_registry: None) -> None:
    kbitprep.register_backend(_marker_backend("rt_low", priority=1))
    kbitprep.register_backend(_marker_backend("rt_high", priority=7))
    model = tiny_llama(torch.float32)
    model.test_marker = True
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "rt_high"
    assert detection.reason == "rt_high sees model.test_marker"
    p = kbitprep.plan(model)
    assert p.backend == "rt_high"
    assert warning_of(p, "detection", "rt_low")
    # the other order of registration gives the same answer
    kbitprep.register_backend(_marker_backend("rt_low", priority=9), replace=True)
    assert kbitprep.detect_backend(model).backend == "rt_low"
    assert warning_of(kbitprep.plan(model), "detection", "rt_high")


def test_get_backend_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownBackendError) as info:
        kbitprep.get_backend("nope")
    assert isinstance(info.value, LookupError) and isinstance(info.value, KbitPrepError)
    message = str(info.value)
    for known in ("'bitsandbytes'", "'torchao'", "'none'", "'generic'"):
        assert known in message
    assert "'nope'" in message


@pytest.fixture
def torchao_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the registry see torchao as not installed (``find_spec`` returns None for it)."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        if name == "torchao" or name.startswith("torchao."):
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_builtin_with_missing_library_is_reported_and_still_returned(torchao_missing: None) -> None:
    """The status says what is missing; the strategy is still returned, because it needs its
    library only for a fix-up that calls it (issue 12), and then ``require`` raises."""
    info = kbitprep.available_backends()["torchao"]
    assert info.source == "builtin"
    assert info.status == "missing dependency: pip install 'kbitprep[torchao]'"
    backend = kbitprep.get_backend("torchao")
    assert type(backend).__name__ == "TorchAoBackend"
    assert backend.missing_requirements() == ("torchao",)
    with pytest.raises(BackendUnavailableError) as exc:
        backend.require("probing a quantized layer")
    assert isinstance(exc.value, ImportError) and isinstance(exc.value, KbitPrepError)
    assert exc.value.install_hint == "pip install 'kbitprep[torchao]'"
    assert "'torchao'" in str(exc.value) and "probing a quantized layer" in str(exc.value)
    assert f"`{exc.value.install_hint}`" in str(exc.value)
    # the others are unaffected
    assert kbitprep.available_backends()["bitsandbytes"].status == "ok"
    assert kbitprep.get_backend("bitsandbytes").missing_requirements() == ()


# -- detection tiers ------------------------------------------------------------------------


def _strip(model: nn.Module, *names: str) -> None:
    for name in names:
        if name.startswith("config."):
            config = model.config
            attr = name.removeprefix("config.")
            if attr in vars(config):
                delattr(config, attr)
            assert getattr(config, attr, None) is None
        elif name in vars(model):
            delattr(model, name)


def _bnb8() -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


TIER_CASES: dict[str, tuple[str, Callable[[], Any], str, str, str]] = {
    # label: (library, config, backend, legacy-attribute reason, layer reason)
    "bnb4": ("bitsandbytes", bnb4_config, "bitsandbytes", "is_loaded_in_4bit", "14 Linear4bit"),
    "bnb8": ("bitsandbytes", _bnb8, "bitsandbytes", "is_loaded_in_8bit", "14 Linear8bitLt"),
    "torchao": ("torchao", _torchao, "torchao", "quantization_method", "torchao Int8Tensor"),
}


@pytest.mark.parametrize("label", list(TIER_CASES))
def test_detection_in_each_tier(label: str, model_root: str) -> None:
    lib, make_config, backend, legacy, layers = TIER_CASES[label]
    pytest.importorskip(lib, reason=f"needs {lib} (pip install {lib})")
    model = load(saved_tiny(model_root), quantization_config=make_config())

    def detect() -> kbitprep.Detection:
        d = kbitprep.detect_backend(model)
        assert d.backend == backend, d
        return d

    assert "hf_quantizer" in detect().reason  # tier 1a: the transformers quantizer
    _strip(model, "hf_quantizer")
    assert "config.quantization_config.quant_method" in detect().reason  # 1b: config object
    model.config.quantization_config = model.config.quantization_config.to_dict()
    assert "config.quantization_config['quant_method']" in detect().reason  # 1c: config dict
    _strip(model, "config.quantization_config")
    reason = detect().reason  # tier 2: legacy attributes
    assert "quantization_method" in reason
    _strip(model, "quantization_method")
    if legacy != "quantization_method":
        assert legacy in detect().reason
    _strip(model, "is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "config._is_quantized")
    assert not any(
        hasattr(model, a) for a in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit")
    )
    assert layers in detect().reason  # tier 3: the layers themselves


def test_torchao_quantize_directly_is_found_by_its_tensors() -> None:
    pytest.importorskip("torchao", reason="needs torchao (pip install torchao)")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_llama(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "torchao"
    assert "Int8Tensor" in detection.reason


def test_unquantized_model_detects_none() -> None:
    detection = kbitprep.detect_backend(tiny_llama(torch.bfloat16))
    assert detection.backend == "none" and detection.reason


def test_detection_looks_through_peft_model(model_root: str) -> None:
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    plain = kbitprep.detect_backend(model)
    peft_model = add_lora(model)
    assert kbitprep.detect_backend(peft_model) == plain
    assert plain.backend == "bitsandbytes"
