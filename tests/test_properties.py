"""Property tests (issue 5): invariants of ``plan`` / ``prepare`` / ``undo`` over random tiny models.

Each example builds a tiny Llama from its config (1-3 layers, tied or untied embeddings,
fp16/bf16/fp32), quantizes it in-process with a real backend layer where that is cheap on CPU
(bitsandbytes ``Linear4bit`` with uint8 or bf16 storage, ``Linear8bitLt``, torchao
``Int8WeightOnlyConfig``, ``HQQLinear`` when kbitprep has its hqq strategy), or only flags it
(transformers attributes, or a ``config.quantization_config`` dict as transformers 4.57 writes
it), attaches LoRA before or after, and prepares it with a random upcast policy, upcast dtype,
``keep_in_low_precision`` patterns and checkpointing settings. Then, whatever was drawn:

* quantized storage (integer / subclass parameters, bitsandbytes quant states, HQQ metadata,
  buffers) keeps every byte;
* every base parameter ends frozen and every adapter parameter trainable;
* ``plan`` predicts exactly what ``prepare`` does: the same record, the parameters whose dtype
  changed are exactly ``casts`` (with their byte figures), ``bytes_delta`` is the measured change,
  the warnings emitted are the plan's, checkpointing and hooks are as the plan says;
* ``plan`` itself changes nothing;
* a second ``prepare`` changes nothing and records nothing;
* ``undo`` restores dtypes, values (bit-exact), ``requires_grad``, hooks, checkpointing and
  ``use_cache``;
* a forward and backward after prepare raise no dtype error, and every LoRA tensor gets a grad.

The default hypothesis profile (tests/conftest.py) keeps this file within about 2 minutes on
2 cores; ``nox -s fuzz`` runs the ``fuzz`` profile with many more examples.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install hypothesis)")
pytest.importorskip("transformers", reason="the property tests build transformers Llama models")
pytest.importorskip("peft", reason="the property tests attach LoRA with peft")

from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kbitprep  # noqa: E402
from _lora import add_lora  # noqa: E402
from _measure import param_bytes  # noqa: E402
from _models import tiny_llama  # noqa: E402
from kbitprep.backends.base import tensor_nbytes  # noqa: E402

VOCAB = 128
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
UPCAST_DTYPES = {**DTYPES, "float64": torch.float64}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_BNB = _installed("bitsandbytes")
HAS_TORCHAO = _installed("torchao")
# hqq is only drawn once kbitprep has its strategy: without one, nothing stops the fp32 upcast
# that breaks HQQLinear, and that is the strategy's job, not the orchestrator's
HAS_HQQ = _installed("hqq") and _installed("kbitprep.backends.hqq")

# quantization kinds: real layers where cheap on CPU, otherwise the transformers flags only
KINDS = ["none", "generic", "bnb4-flags", "torchao-flags"]
if HAS_BNB:
    KINDS += ["bnb4", "bnb4-bf16-storage", "bnb8"]
if HAS_TORCHAO:
    KINDS += ["torchao-int8"]
if HAS_HQQ:
    KINDS += ["hqq"]

QUANT_METHOD = {
    "generic": "quanto",
    "bnb4-flags": "bitsandbytes",
    "torchao-flags": "torchao",
    "bnb4": "bitsandbytes",
    "bnb4-bf16-storage": "bitsandbytes",
    "bnb8": "bitsandbytes",
    "torchao-int8": "torchao",
    "hqq": "hqq",
}


def _peft_lora_on_bare_torchao() -> bool:
    """Whether this peft attaches LoRA to a torchao layer quantized without transformers (peft
    0.19 requires ``get_apply_tensor_subclass``, found only on ``model.hf_quantizer``)."""
    import inspect

    try:
        from peft.tuners.lora.torchao import TorchaoLoraLinear
    except ImportError:
        return True
    arg = inspect.signature(TorchaoLoraLinear.__init__).parameters.get("get_apply_tensor_subclass")
    return arg is None or arg.default is not inspect.Parameter.empty


PEFT_LORA_ON_BARE_TORCHAO = _peft_lora_on_bare_torchao()
# names, a glob and a whole block (issue 16: a name covers its subtree); a pattern that matches
# nothing now raises before anything changes, which tests/test_invariant_options.py checks
KEEP_PATTERNS = ("lm_head", "norm", "embed_tokens", "*layernorm*", "model.layers.0.*", "layers.0")


# -- callable upcast policies (named, so hypothesis prints something readable) ----------------


@dataclass(frozen=True)
class Policy:
    name: str
    fn: Callable[[str, nn.Parameter, nn.Module], bool]

    def __call__(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return self.fn(name, param, module)

    def __repr__(self) -> str:
        return f"Policy({self.name})"


def _hashed(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] % 2 == 0


POLICIES = [
    Policy("norms", lambda n, p, m: "norm" in type(m).__name__.lower()),
    Policy("embeddings", lambda n, p, m: isinstance(m, nn.Embedding)),
    Policy("lm_head", lambda n, p, m: n.endswith("lm_head.weight")),
    Policy("hashed-half", _hashed),
    Policy("everything", lambda n, p, m: True),
]


# -- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    layers: int
    tie: bool
    dtype: str
    kind: str
    evidence: str  # "layers" | "attributes" | "config-dict" | "quantizer"
    adapters: str  # "none" | "before" | "after"
    upcast: Any
    upcast_dtype: str
    keep: tuple[str, ...]
    use_gradient_checkpointing: bool
    use_reentrant: bool | None  # None: gradient_checkpointing_kwargs not passed
    already_checkpointing: bool | None  # None: off before prepare; else its use_reentrant


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    kind = draw(st.sampled_from(KINDS))
    adapters = draw(st.sampled_from(["none", "before", "after"]))
    if kind == "none":
        evidence = "layers"
    elif kind == "generic":
        evidence = draw(st.sampled_from(["attributes", "config-dict"]))
    elif kind in ("bnb4-flags", "torchao-flags"):
        evidence = draw(st.sampled_from(["attributes", "config-dict", "quantizer"]))
    elif kind == "torchao-int8" and adapters != "none" and not PEFT_LORA_ON_BARE_TORCHAO:
        evidence = "quantizer"  # this peft finds torchao's requantize function only through hf_quantizer
    elif kind == "hqq":  # transformers 5 cannot load hqq (BACKENDS.md 5.2): no quantizer stand-in
        evidence = draw(st.sampled_from(["layers", "attributes", "config-dict"]))
    else:
        evidence = draw(st.sampled_from(["layers", "attributes", "config-dict", "quantizer"]))
    return Scenario(
        layers=draw(st.integers(1, 3)),
        tie=draw(st.booleans()),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        kind=kind,
        evidence=evidence,
        adapters=adapters,
        upcast=draw(st.sampled_from(["auto", "all", "none", *POLICIES])),
        upcast_dtype=draw(st.sampled_from(["float32", "float32", "bfloat16", "float16", "float64"])),
        keep=tuple(draw(st.lists(st.sampled_from(KEEP_PATTERNS), max_size=2, unique=True))),
        use_gradient_checkpointing=draw(st.booleans()),
        use_reentrant=draw(st.sampled_from([None, False, True])),
        already_checkpointing=draw(st.sampled_from([None, None, False, True])),
    )


# -- building ---------------------------------------------------------------------------------


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, make(child))


def _bnb4(storage: torch.dtype) -> Callable[[nn.Linear], nn.Module]:
    bnb: Any = importlib.import_module("bitsandbytes")

    def make(lin: nn.Linear) -> nn.Module:
        layer: nn.Module = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=False,
            compute_dtype=lin.weight.dtype,
            quant_type="nf4",
            quant_storage=storage,
        )
        layer.weight = bnb.nn.Params4bit(
            lin.weight.data.clone(),
            requires_grad=False,
            quant_type="nf4",
            quant_storage=storage,
            compress_statistics=True,
        ).to("cpu")  # quantizes
        return layer

    return make


def _bnb8(lin: nn.Linear) -> nn.Module:
    bnb: Any = importlib.import_module("bitsandbytes")
    layer: nn.Module = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return layer


def _hqq(lin: nn.Linear) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    cfg["weight_quant_params"]["optimize"] = False  # 40x faster on 2 cores, same error (BACKENDS.md 5.2)
    layer: nn.Module = HQQLinear(lin, cfg, compute_dtype=lin.weight.dtype, device="cpu")
    return layer


def _quantization_config(kind: str) -> Any:
    transformers: Any = importlib.import_module("transformers")
    if kind.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    if kind == "bnb8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _turn_on_checkpointing(model: Any, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.57
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build(s: Scenario) -> nn.Module:
    model: Any = tiny_llama(DTYPES[s.dtype], num_hidden_layers=s.layers, tie_word_embeddings=s.tie, vocab_size=VOCAB)
    if s.tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if s.kind in ("bnb4", "bnb4-bf16-storage"):
        _swap_linears(model, _bnb4(torch.bfloat16 if s.kind == "bnb4-bf16-storage" else torch.uint8))
    elif s.kind == "bnb8":
        _swap_linears(model, _bnb8)
    elif s.kind == "hqq":
        _swap_linears(model, _hqq)
    elif s.kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # decoder linears only, as transformers' TorchAoHfQuantizer does (lm_head stays float)
        quantize_(
            model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn
        )
    method = QUANT_METHOD.get(s.kind)
    if method is not None and s.evidence == "attributes":
        model.is_quantized = True
        model.quantization_method = method
        if s.kind in ("bnb4", "bnb4-bf16-storage", "bnb4-flags"):
            model.is_loaded_in_4bit = True
        elif s.kind == "bnb8":
            model.is_loaded_in_8bit = True
    elif method is not None and s.evidence == "config-dict":
        model.config.quantization_config = {"quant_method": method}  # as transformers 4.57 stores it
    elif method is not None and s.evidence == "quantizer":
        # a stand-in for the HfQuantizer from_pretrained attaches, holding the real config object
        model.hf_quantizer = SimpleNamespace(quantization_config=_quantization_config(s.kind), is_trainable=True)
    if s.already_checkpointing is not None:
        _turn_on_checkpointing(model, s.already_checkpointing)
    built: nn.Module = add_lora(model) if s.adapters == "before" else model
    return built


# -- observing --------------------------------------------------------------------------------


def _fingerprint(t: Any) -> str:
    """sha256 of the real bytes of ``t`` (inner tensors of a wrapper subclass), with dtype and shape."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ctx = flatten()
        return "|".join(_fingerprint(getattr(t, n)) for n in names) + f"@{t.dtype}"
    data = torch.Tensor.detach(t).contiguous().reshape(-1)
    raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    return f"{hashlib.sha256(raw.numpy().tobytes()).hexdigest()}:{t.dtype}:{tuple(t.shape)}"


def storage(model: nn.Module) -> dict[str, str]:
    """Fingerprints of everything that is quantized storage, judged without asking kbitprep:
    integer or subclass parameters, bitsandbytes quant states and SCB, HQQ metadata, buffers."""
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point() or type(p) is not nn.Parameter or hasattr(p, "__tensor_flatten__"):
            out[name] = _fingerprint(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for key, value in sorted(state.as_dict(packed=True).items()):
                if isinstance(value, torch.Tensor):
                    out[f"{name}.quant_state.{key}"] = _fingerprint(value)
    for name, b in model.named_buffers():
        out[name] = _fingerprint(b)
    for mname, module in model.named_modules():
        # bitsandbytes 8-bit: the first forward moves the row scales from weight.SCB to state.SCB
        weight = module._parameters.get("weight")
        scb = getattr(weight, "SCB", None)
        scb = scb if isinstance(scb, torch.Tensor) else getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            out[f"{mname}.SCB"] = _fingerprint(scb)
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict):
            for key, value in sorted(meta.items()):
                if isinstance(value, torch.Tensor):
                    out[f"{mname}.meta.{key}"] = _fingerprint(value)
    return out


@dataclass
class State:
    """Everything prepare may touch, keyed by object identity (so a PeftModel attached later
    still compares), plus storage fingerprints."""

    params: dict[int, tuple[str, str, bool, str]]  # id -> (name, dtype, requires_grad, bytes)
    hooks: dict[int, tuple[str, int, int]]  # module id -> (name, forward hooks, forward pre-hooks)
    checkpointing: dict[int, tuple[str, Any]]  # module id -> (name, gradient_checkpointing flag)
    extras: dict[str, Any]  # use_cache, transformers' input-grad hook bookkeeping
    storage: dict[str, str]
    keep_alive: list[Any]

    def diff(
        self, other: State, *, what: tuple[str, ...] = ("params", "hooks", "checkpointing", "extras", "storage")
    ) -> list[str]:
        out: list[str] = []
        for field_name in what:
            mine, theirs = getattr(self, field_name), getattr(other, field_name)
            for key in sorted(set(mine) | set(theirs), key=str):
                if mine.get(key) != theirs.get(key):
                    out.append(f"{field_name}: {mine.get(key)!r} -> {theirs.get(key)!r}")
        return out


def observe(model: nn.Module, base: nn.Module, params_of: nn.Module | None = None) -> State:
    params_of = params_of if params_of is not None else model
    params: dict[int, tuple[str, str, bool, str]] = {}
    keep: list[Any] = []
    for name, p in params_of.named_parameters():
        params[id(p)] = (name, str(p.dtype), p.requires_grad, _fingerprint(p))
        keep.append(p)
    hooks: dict[int, tuple[str, int, int]] = {}
    gc: dict[int, tuple[str, Any]] = {}
    for name, m in model.named_modules():
        hooks[id(m)] = (name, len(m._forward_hooks), len(m._forward_pre_hooks))
        gc[id(m)] = (name, getattr(m, "gradient_checkpointing", None))
        keep.append(m)
    extras = {
        "use_cache": getattr(getattr(base, "config", None), "use_cache", None),
        "_require_grads_hook": "_require_grads_hook" in vars(base),
        "_require_grads_hooks": len(vars(base).get("_require_grads_hooks", None) or ()),
    }
    return State(params, hooks, gc, extras, storage(params_of), keep)


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _options(s: Scenario) -> dict[str, Any]:
    return dict(
        use_gradient_checkpointing=s.use_gradient_checkpointing,
        gradient_checkpointing_kwargs=None if s.use_reentrant is None else {"use_reentrant": s.use_reentrant},
        upcast=s.upcast,
        upcast_dtype=UPCAST_DTYPES[s.upcast_dtype],
        keep_in_low_precision=s.keep,
    )


def _prepare(model: nn.Module, s: Scenario) -> tuple[kbitprep.PreparationReport, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = kbitprep.prepare(model, **_options(s))
    return report, [str(w.message) for w in caught if issubclass(w.category, kbitprep.KbitPrepWarning)]


def _is_adapter(name: str) -> bool:
    return "lora_" in name


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _current_use_reentrant(model: nn.Module) -> bool:
    # transformers 4.57 and 5 keep functools.partial(checkpoint, **kwargs) on each checkpointed layer
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            func: Any = m._gradient_checkpointing_func
            return bool(func.keywords.get("use_reentrant", True))
    raise AssertionError("checkpointing is off")


# -- the properties ---------------------------------------------------------------------------


def check_prepare(model: nn.Module, s: Scenario) -> tuple[kbitprep.PreparationReport, State, State]:
    """Run plan, prepare and a second prepare on ``model``; assert every state property.

    Returns the first report and the states before and after preparation."""
    base = _unwrap(model)
    before = observe(model, base)
    bytes_before = param_bytes(model)

    # plan changes nothing
    p = kbitprep.plan(model, **_options(s))
    note(str(p))
    assert not before.diff(observe(model, base)), f"plan changed the model: {before.diff(observe(model, base))}"

    report, emitted = _prepare(model, s)
    after = observe(model, base)

    # plan predicts prepare: the same record, the same warnings
    assert report.to_dict() == p.to_dict()
    assert emitted == list(p.warnings)

    # quantized storage never changes
    assert after.storage == before.storage, "quantized storage changed"

    # every base parameter frozen, every adapter parameter trainable
    wrong = [n for n, p_ in model.named_parameters() if p_.requires_grad != _is_adapter(n)]
    assert not wrong, f"requires_grad wrong after prepare: {wrong}"
    assert set(p.kept_trainable) == {n for n, _ in model.named_parameters(remove_duplicate=False) if _is_adapter(n)}
    assert p.frozen == sum(1 for n, _ in model.named_parameters() if not _is_adapter(n))

    # the parameters whose dtype changed are exactly the plan's casts, with its byte figures
    changed = {
        before.params[pid][0]: (before.params[pid][1], after.params[pid][1])
        for pid in before.params
        if before.params[pid][1] != after.params[pid][1]
    }
    planned = {c.name: (str(c.from_dtype), str(c.to_dtype)) for c in p.casts}  # observe() records str(dtype)
    assert changed == planned
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in p.casts:
        assert c.bytes_after == tensor_nbytes(params[c.name])
        for other in c.tied:
            assert params[other] is params[c.name], f"{other} no longer tied to {c.name}"
    assert param_bytes(model) - bytes_before == p.bytes_delta

    # checkpointing and hooks as the plan says; the report tells whether checkpointing is on
    assert p.gradient_checkpointing == _checkpointing_on(base)
    if p.gradient_checkpointing:
        assert p.use_reentrant == _current_use_reentrant(base)
    else:
        assert after.checkpointing == before.checkpointing
    modules = dict(model.named_modules())
    for name in p.input_grad_modules:
        assert kbitprep.steps.checkpoint_transformers.has_input_grad_hook(modules[name])
    for row in p.precision:
        spec = kbitprep.steps.cast_at_use.spec_of(modules[row.name])
        assert spec is not None and spec.dtype == row.computes

    # a second prepare changes nothing and records nothing
    second, _ = _prepare(model, s)
    assert not after.diff(observe(model, base)), f"second prepare changed: {after.diff(observe(model, base))}"
    assert second.casts == () and second.bytes_delta == 0
    second.undo()
    assert not after.diff(observe(model, base)), f"undo of a no-op prepare changed: {after.diff(observe(model, base))}"
    return report, before, after


def check_training(model: nn.Module) -> None:
    """A forward and backward in train mode raise no dtype error; every LoRA tensor gets a grad."""
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss.float()), "loss is not finite"
    lora = {n: p for n, p in model.named_parameters() if _is_adapter(n)}
    if out.loss.requires_grad:
        out.loss.backward()
    missing = [n for n, p in lora.items() if p.grad is None]
    assert not missing, f"LoRA tensors without a gradient: {missing}"
    for p in model.parameters():
        p.grad = None
    model.eval()


@pytest.mark.slow
@given(s=scenarios())
def test_prepare_invariants_hold_for_any_model_and_options(s: Scenario) -> None:
    """Storage bytes kept, base frozen / adapters trainable, plan == prepare (casts, bytes_delta,
    warnings, hooks), second prepare a no-op, a training step without dtype errors, and undo
    restoring everything bit-exactly, over random tiny models, backends and options."""
    model = build(s)
    report, before, _after = check_prepare(model, s)
    base = _unwrap(model)

    if s.adapters == "after":
        # peft attaches to the prepared model; undo must still restore the base parameters
        model = add_lora(model)
        check_training(model)
        report.undo()
        now = observe(model, base, params_of=base).params
        # peft's get_peft_model freezes base parameters itself, after prepare: requires_grad is
        # not ours to restore here, dtypes and bytes are
        problems = [
            f"{name}: {dtype} -> {now[pid][1]}" if now[pid][1] != dtype else f"{name}: bytes differ"
            for pid, (name, dtype, _rg, digest) in before.params.items()
            if now[pid][1] != dtype or now[pid][3] != digest
        ]
        assert not problems, f"undo did not restore: {problems}"
    else:
        check_training(model)
        report.undo()
        problems = before.diff(observe(model, base))
        assert not problems, f"undo did not restore: {problems}"
        report.undo()  # a second undo does nothing
        assert not before.diff(observe(model, base))
