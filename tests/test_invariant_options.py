"""Invariants of the options beyond peft (issue 16, items 3 and 7).

Names match as in peft (``keep_in_low_precision``): a sequence of names matches a module by its
exact name or a dotted suffix and covers everything under it (a parameter may be named the same
way); a single string is a regular expression full-matched against module names; a pattern
that matches nothing raises ``InvalidArgumentError`` before anything changes, naming the closest
names. Checked with hypothesis over the module names of tiny unquantized Llama (tied and
untied), T5, Llava and Whisper models, bare and wrapped by ``get_peft_model``: after ``prepare``
the parameters still in their stored bf16 are exactly those an independent reading of the rule
predicts (``re.fullmatch`` / string suffixes over ``named_modules``, each matched module's
``parameters()``), since every other floating parameter of an unquantized model is upcast.

Selective checkpointing never costs more: on a 4-layer tiny Llama in nf4 with LoRA on its first,
a middle or its last block, in both checkpointing modes, ``checkpoint_trainable_blocks_only``
keeps no more activation bytes than checkpointing every block and ``checkpoint_every_n_layers=2``
no more than transformers' own every-second-block layout (bytes of the distinct storages
``torch.autograd.graph.saved_tensors_hooks`` packs during the forward); the blocks before the
adapter's build no graph; the adapter gradients are those of checkpointing every block, to the
bit; the plan's block count is what the flags show; ``undo`` removes every hook and flag.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("hypothesis")
pytest.importorskip("peft")

from hypothesis import assume, given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kbitprep  # noqa: E402
from _matrix import ARCHS as MATRIX  # noqa: E402
from _measure import model_state  # noqa: E402
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK, load, tiny_llama  # noqa: E402
from _quantized import bnb4_config  # noqa: E402

# -- item 3: names match as in peft ------------------------------------------------------------


def _llama(tie: bool) -> nn.Module:
    return tiny_llama(torch.bfloat16, tie_word_embeddings=tie)


def _bf16(arch: str) -> nn.Module:
    """The matrix's ``arch`` (tests/_matrix.py: T5, Llava, Whisper), built in bf16."""
    return MATRIX[arch].build().to(torch.bfloat16)  # type: ignore[no-any-return]


# architecture -> (builder, LoRA targets)
ARCHS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "llama": (functools.partial(_llama, False), ["q_proj", "v_proj"]),
    "llama-tied": (functools.partial(_llama, True), ["q_proj", "v_proj"]),
    "t5": (functools.partial(_bf16, "t5"), ["q", "v"]),
    "llava": (functools.partial(_bf16, "llava"), ["q_proj", "v_proj"]),
    "whisper": (functools.partial(_bf16, "whisper"), ["q_proj", "v_proj"]),
}


@functools.cache
def _template(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch][0]()


@functools.cache
def _module_names(arch: str) -> tuple[str, ...]:
    return tuple(n for n, _m in _template(arch).named_modules() if n)


def _fresh(arch: str, wrapped: bool) -> tuple[nn.Module, nn.Module]:
    """(what is passed to prepare, the transformers model inside it)."""
    model = copy.deepcopy(_template(arch))
    if not wrapped:
        return model, model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=ARCHS[arch][1], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    return peft_model, peft_model.get_base_model()


def _adapter_ids(base: nn.Module) -> set[int]:
    return {id(p) for n, p in base.named_parameters() if "lora_" in n}


def _params_under(modules: Iterator[nn.Module]) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def _prepare(model: nn.Module, keep: Any) -> kbitprep.PreparationReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        return kbitprep.prepare(model, keep_in_low_precision=keep)


def _low(base: nn.Module) -> set[int]:
    """Base parameters still in their stored bf16 after prepare (an unquantized model upcasts
    every other floating base parameter to fp32, as peft)."""
    return {id(p) for p in base.parameters() if p.dtype == torch.bfloat16} - _adapter_ids(base)


@dataclass(frozen=True)
class NameCase:
    arch: str
    wrapped: bool
    module: str  # the module drawn
    pattern: str  # its exact name or one of its dotted suffixes


@st.composite
def name_cases(draw: st.DrawFn) -> NameCase:
    arch = draw(st.sampled_from(sorted(ARCHS)))
    module = draw(st.sampled_from(_module_names(arch)))
    parts = module.split(".")
    cut = draw(st.integers(0, len(parts) - 1))
    return NameCase(arch, draw(st.booleans()), module, ".".join(parts[cut:]))


@given(case=name_cases())
def test_a_module_name_keeps_its_whole_subtree_low_and_nothing_else(case: NameCase) -> None:
    """For any module, its exact name or any dotted suffix of it, as a one-name sequence, keeps
    every floating parameter under it (and under every other module that name matches) at its
    stored dtype, and nothing else; through a PeftModel wrapper the same names match."""
    note(repr(case))
    model, base = _fresh(case.arch, case.wrapped)
    p = case.pattern
    matched = [m for n, m in base.named_modules(remove_duplicate=False) if n and (n == p or n.endswith("." + p))]
    named = {id(t) for n, t in base.named_parameters(remove_duplicate=False) if n == p or n.endswith("." + p)}
    expected = (_params_under(iter(matched)) | named) - _adapter_ids(base)
    drawn = dict(base.named_modules())[case.module]
    assert _params_under(iter([drawn])) - _adapter_ids(base) <= expected
    _prepare(model, (p,))
    assert _low(base) == expected


_REGEX_KINDS = ("escaped", "digits", "leaf", "leaf-anywhere", "either", "children", "nothing")


@dataclass(frozen=True)
class RegexCase:
    arch: str
    wrapped: bool
    regex: str


@st.composite
def regex_cases(draw: st.DrawFn) -> RegexCase:
    arch = draw(st.sampled_from(sorted(ARCHS)))
    names = _module_names(arch)
    a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
    leaf = re.escape(a.rpartition(".")[2])
    regex = {
        "escaped": re.escape(a),
        "digits": re.sub(r"[0-9]+", r"[0-9]+", re.escape(a)),
        "leaf": r".*\." + leaf,
        "leaf-anywhere": ".*" + leaf,
        "either": f"({re.escape(a)}|{re.escape(b)})",
        "children": re.escape(a) + r"\..*",
        "nothing": re.escape(a) + "_nope",
    }[draw(st.sampled_from(_REGEX_KINDS))]
    return RegexCase(arch, draw(st.booleans()), regex)


@given(case=regex_cases())
def test_a_single_string_is_a_regex_full_matched_against_module_names(case: RegexCase) -> None:
    """A string keeps exactly the subtrees of the modules ``re.fullmatch`` selects among the
    transformers model's module names (as peft reads a ``target_modules`` string); when it
    selects none, InvalidArgumentError, and the model is as before."""
    note(repr(case))
    model, base = _fresh(case.arch, case.wrapped)
    matched = [m for n, m in base.named_modules(remove_duplicate=False) if n and re.fullmatch(case.regex, n)]
    if not matched:
        before = model_state(model)
        with pytest.raises(kbitprep.InvalidArgumentError, match="matches no module"):
            _prepare(model, case.regex)
        assert model_state(model) == before
        return
    _prepare(model, case.regex)
    assert _low(base) == _params_under(iter(matched)) - _adapter_ids(base)


@given(
    arch=st.sampled_from(sorted(ARCHS)),
    wrapped=st.booleans(),
    bad=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=16),
    with_good=st.booleans(),
)
def test_a_name_that_matches_nothing_raises_and_changes_nothing(
    arch: str, wrapped: bool, bad: str, with_good: bool
) -> None:
    """A name that is no module's or parameter's name or dotted suffix raises
    InvalidArgumentError naming it (also beside a name that matches), and the model keeps every
    dtype, value, flag and hook."""
    model, base = _fresh(arch, wrapped)
    names = [n for n, _m in base.named_modules()] + [n for n, _p in base.named_parameters()]
    assume(not any(n == bad or n.endswith("." + bad) for n in names))
    keep = ("lm_head", bad) if with_good and arch != "whisper" else (bad,)
    before = model_state(model)
    with pytest.raises(kbitprep.InvalidArgumentError, match=re.escape(repr(bad))):
        _prepare(model, keep)
    assert model_state(model) == before


@pytest.mark.parametrize(
    ("keep", "closest"),
    [
        (("lm_hed",), "'lm_head'"),
        (("embed_tokns",), "'embed_tokens'"),
        (("model.layer.0",), "'model.layers.0'"),
        (("q_prj",), "'q_proj'"),
    ],
)
def test_a_typo_raises_naming_the_closest_module(keep: tuple[str, ...], closest: str) -> None:
    model = tiny_llama()
    with pytest.raises(kbitprep.InvalidArgumentError) as info:
        kbitprep.plan(model, keep_in_low_precision=keep)
    message = str(info.value)
    assert f"{keep[0]!r}" in message and "closest names:" in message
    assert closest in message.partition("closest names:")[2].partition(". ")[0]


def test_a_comma_string_raises_and_suggests_the_sequence() -> None:
    """peft reads a string as one regex; kbitprep does too, so a comma list matches nothing and
    raises, saying how to pass several names."""
    model = tiny_llama()
    with pytest.raises(kbitprep.InvalidArgumentError) as info:
        kbitprep.plan(model, keep_in_low_precision="lm_head,embed_tokens")
    assert "keep_in_low_precision=('lm_head', 'embed_tokens')" in str(info.value)


def test_parameter_names_and_globs_in_a_sequence_still_match() -> None:
    """What earlier releases accepted keeps working: a parameter's full name or dotted suffix
    keeps that parameter only; an fnmatch glob matches whole names."""
    model = tiny_llama()
    by_name = dict(model.named_parameters())
    _prepare(model, ("model.norm.weight", "layers.1.input_layernorm.weight", "*post_attention_layernorm*"))
    low = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert low == {
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
    }
    assert all(by_name[n].dtype == torch.float32 for n in set(by_name) - low)


def test_a_bad_regex_or_an_empty_name_is_an_invalid_argument() -> None:
    model = tiny_llama()
    for keep in ("(", "", ("lm_head", "")):
        with pytest.raises(kbitprep.InvalidArgumentError):
            kbitprep.plan(model, keep_in_low_precision=keep)


# -- item 7: selective checkpointing never costs more ------------------------------------------

tf5_only = pytest.mark.skipif(
    not ENABLE_ADDS_INPUT_GRAD_HOOK or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs bitsandbytes and transformers 5 activation_checkpointing_enable(every_n_layers)",
)
LAYERS = 4
POSITIONS = {"first": 0, "middle": 2, "last": 3}
LAYOUTS = {"trainable-only": {"checkpoint_trainable_blocks_only": True}, "every-2": {"checkpoint_every_n_layers": 2}}


@functools.cache
def _tiny4(root: str) -> str:
    path = Path(root) / "tiny4-bfloat16"
    if not (path / "config.json").exists():
        tiny_llama(torch.bfloat16, num_hidden_layers=LAYERS).save_pretrained(path)  # type: ignore[operator]
    return str(path)


@dataclass
class Step:
    """One training forward/backward, measured."""

    saved: int  # bytes of distinct storages packed for the backward during the forward
    grads: dict[str, torch.Tensor]
    packs: list[int]  # tensors packed while each block ran (outside any inner checkpoint)
    out_grad: list[bool]  # whether each block's output required grad
    flags: list[bool]  # each block's gradient_checkpointing flag after the step


def _lora(model: nn.Module, layer: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, layers_to_transform=[layer],
        init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return get_peft_model(model, cfg)


def _measure(peft_model: nn.Module, base: nn.Module) -> Step:
    blocks = list(base.model.layers)  # type: ignore[union-attr]
    current: list[int] = []
    packs = [0] * len(blocks)
    out_grad = [False] * len(blocks)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        if current:
            packs[current[-1]] += 1
        return t

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: current.append(i)))

        def after(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            current.pop()
            hidden = out[0] if isinstance(out, tuple) else out
            out_grad[i] = bool(hidden.requires_grad)

        handles.append(block.register_forward_hook(after))
    peft_model.train()
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    flags = [bool(b.gradient_checkpointing) for b in blocks]
    return Step(sum(storages.values()), grads, packs, out_grad, flags)


def _quiet_prepare(model: nn.Module, **options: Any) -> kbitprep.PreparationReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        return kbitprep.prepare(model, **options)


@functools.cache
def _baseline(root: str, layer: int, reentrant: bool, every_n: int) -> Step:
    """The layout without kbitprep's frozen-prefix rule: every block checkpointed (every_n=1),
    or transformers' own every-n-th-block layout set after a default prepare."""
    model = load(_tiny4(root), quantization_config=bnb4_config())
    _quiet_prepare(model, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if every_n != 1:
        model.activation_checkpointing_enable(  # type: ignore[operator]
            activation_checkpointing_kwargs={"use_reentrant": reentrant}, every_n_layers=every_n
        )
    return _measure(_lora(model, layer), model)


@tf5_only
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("position", list(POSITIONS))
def test_selective_checkpointing_never_keeps_more_than_its_baseline(
    position: str, reentrant: bool, layout: str, model_root: str
) -> None:
    layer = POSITIONS[position]
    every_n = LAYOUTS[layout].get("checkpoint_every_n_layers", 1)
    everything = _baseline(model_root, layer, reentrant, 1)
    baseline = _baseline(model_root, layer, reentrant, every_n)

    model = load(_tiny4(model_root), quantization_config=bnb4_config())
    hooks_before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in model.model.layers]  # type: ignore[union-attr]
    report = _quiet_prepare(model, gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **LAYOUTS[layout])
    peft_model = _lora(model, layer)
    got = _measure(peft_model, model)
    sizes = f"saved bytes {got.saved}, baseline {baseline.saved}, all blocks checkpointed {everything.saved}"

    # never more activation bytes than the layout without the rule (every block checkpointed
    # for trainable-only; transformers' every-n-th layout for every_n)
    assert got.saved <= baseline.saved, sizes
    if layer > 0:  # the frozen prefix kept activations before
        assert got.saved < baseline.saved, sizes
    # the blocks before the adapter's build no graph; the baseline's did
    assert got.out_grad[:layer] == [False] * layer and got.packs[:layer] == [0] * layer
    assert baseline.out_grad[:layer] == [True] * layer
    assert got.out_grad[layer:] == [True] * (LAYERS - layer)
    # from the adapter's block on, the layout's blocks are checkpointed; before it, none
    want_flags = [i >= layer and i % every_n == 0 for i in range(LAYERS)]
    assert got.flags == want_flags
    p = kbitprep.plan(peft_model, gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **LAYOUTS[layout])
    assert p.checkpointed_blocks == (sum(want_flags), LAYERS)
    # the adapters' gradients are those of checkpointing every block, to the bit
    assert set(got.grads) == set(everything.grads) and len(got.grads) == 4
    for name, grad in everything.grads.items():
        assert torch.equal(got.grads[name], grad), name

    report.undo()
    blocks = list(model.model.layers)  # type: ignore[union-attr]
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == hooks_before
    assert [bool(b.gradient_checkpointing) for b in blocks] == [False] * LAYERS
    assert "_kbitprep_selective" not in vars(model)


@tf5_only
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_the_rule_holds_through_a_trainer_enable_a_second_prepare_and_later_steps(
    reentrant: bool, model_root: str
) -> None:
    """A Trainer's enabling call (absorbed by the guard) and a second prepare add nothing; the
    second and third steps keep the layout and the bit-identical gradients; undo restores."""
    layer = POSITIONS["middle"]
    everything = _baseline(model_root, layer, reentrant, 1)
    model = load(_tiny4(model_root), quantization_config=bnb4_config())
    options: dict[str, Any] = {
        "gradient_checkpointing_kwargs": {"use_reentrant": reentrant},
        "checkpoint_trainable_blocks_only": True,
    }
    report = _quiet_prepare(model, **options)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    second = _quiet_prepare(model, **options)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    peft_model = _lora(model, layer)
    peft_model.activation_checkpointing_enable(  # type: ignore[operator]
        activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    for _ in range(2):
        peft_model.zero_grad()
        got = _measure(peft_model, model)
        assert got.saved <= everything.saved
        assert got.flags == [False, False, True, True]
        for name, grad in everything.grads.items():
            assert torch.equal(got.grads[name], grad), name
    second.undo()
    report.undo()
    assert [bool(b.gradient_checkpointing) for b in model.model.layers] == [False] * LAYERS  # type: ignore[union-attr]
    assert not any(len(b._forward_pre_hooks) for b in model.model.layers)  # type: ignore[union-attr]


@tf5_only
def test_the_prefix_follows_the_trainable_blocks_and_survives_a_deepcopy() -> None:
    """The prefix is decided at each training forward: when the first trainable block moves
    earlier, the blocks from it on are checkpointed again; a deep copy of the prepared model
    carries its own rule, bound to its own blocks."""
    model = tiny_llama(torch.float32, num_hidden_layers=LAYERS)
    model.activation_checkpointing_enable()  # type: ignore[operator]
    _quiet_prepare(model, checkpoint_trainable_blocks_only=True)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))

    def step(m: nn.Module, trainable: int) -> list[bool]:
        for i, block in enumerate(m.model.layers):  # type: ignore[union-attr]
            block.requires_grad_(i == trainable)
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        return [bool(b.gradient_checkpointing) for b in m.model.layers]  # type: ignore[union-attr]

    assert step(model, 2) == [False, False, True, True]
    clone = copy.deepcopy(model)
    assert step(model, 1) == [False, True, True, True]
    assert step(clone, 1) == [False, True, True, True]
    assert step(clone, 3) == [False, False, False, True]
    assert step(model, 0) == [True, True, True, True]
    rules = {id(h.__self__) for m in clone.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
             if hasattr(h, "__self__") and type(h.__self__).__name__ == "_FrozenPrefix"}  # fmt: skip
    assert rules == {id(vars(clone)["_kbitprep_selective"])}
