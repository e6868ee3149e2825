"""Whether a floating model input still works in its old dtype after preparation, decided by a
dry run on the meta device.

Two rules meet here: no dtype mismatch anywhere, model inputs included, and no warning that is
not true for the model at hand: a plan that adds no input casts
(peft's policies) leaves a floating input (``inputs_embeds``, ``pixel_values``,
``input_features``) to the caller, and a warning that it must now be passed in another dtype
may be given only when a forward with its old dtype would fail or change the numerics.

Whether it would is not a property of one module's class. The input may be converted on the way
(CLIP's ``CLIPVisionEmbeddings.forward`` casts ``pixel_values`` to its patch embedding's weight
dtype; Whisper's decoder adds its fp32 positions to ``inputs_embeds`` first), and the module that
computes with it first may convert it itself (transformers' RMSNorms compute in fp32 whatever
they receive). So the module whose ``forward`` takes the input is run: a *shadow* of it whose
parameters and buffers are meta tensors of their planned dtypes (nothing is read, allocated or
changed; the model's hooks are left out), once with an input of the old dtype and once with one of
the planned dtype, until the first module that holds parameters and receives a floating tensor
(its first consumer, in execution order; embeddings, which only read ids or positions, do not
count) has returned. The old dtype fails when that run raises and the planned one does not; it
changes the numerics when the consumer returns other dtypes than in the planned run.

Meta kernels do not check operand dtypes for matmuls and convolutions (``F.linear`` of a bf16
input and an fp32 weight returns bf16 on meta, where the CPU and CUDA kernels raise "expected
m1 and m2 to have the same dtype" / "Input type and weight type should be the same": ATen
``LinearAlgebra.cpp``, ``Convolution.cpp``), so the dry run adds that check
(:class:`_OneDtypeOps`). A quantized layer is never run: it returns an empty result in the dtype
its kernel gives (the strategy's ``input_dtype``, which it requires, else its input's, as
bitsandbytes' layers return).

The caller (the compute step, :mod:`kbitprep.steps.compute`) falls back to a structural rule where the dry run cannot
decide (an input shape it cannot build, a forward that needs more arguments or reads real data).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from kbitprep.steps.cast_at_use import _ORIGINAL, _SPEC

__all__ = ["Verdict", "dry_run_input"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
# ops whose CPU / CUDA kernels refuse floating operands of two dtypes, but whose meta kernels do not
_ONE_DTYPE_OPS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.addbmm.default,
        _aten.mv.default,
        _aten.addmv.default,
        _aten.dot.default,
        _aten.vdot.default,
        _aten.convolution.default,
        _aten._convolution.default,
    }
)


class _OneDtypeOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Raise, as the CPU / CUDA kernels do, when a matmul or convolution meets floating operands
    of two dtypes (meta kernels let it pass and return the first operand's dtype)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in _ONE_DTYPE_OPS:
            flat, _spec = tree_flatten((args, kwargs or {}))
            dtypes = {t.dtype for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()}
            if len(dtypes) > 1:
                raise RuntimeError(f"{func}: expected floating operands of one dtype, got {sorted(map(str, dtypes))}")
        return func(*args, **(kwargs or {}))


class _Stop(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Ends the dry run once the first consumer has returned."""


class _Undecided(Exception):  # noqa: N818
    """The dry run cannot decide (a quantized layer it cannot stand in for)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the dry run found for one input dtype.

    Attributes:
        consumer: The first consumer's name in the model (``""`` when none was reached).
        received: The floating dtypes that reached it.
        returned: The floating dtypes it returned.
        error: The error the run raised instead, else ``None``.
    """

    consumer: str = ""
    received: tuple[torch.dtype, ...] = ()
    returned: tuple[torch.dtype, ...] = ()
    error: str | None = None


def _floats(value: Any) -> tuple[torch.dtype, ...]:
    flat, _spec = tree_flatten(value)
    return tuple(t.dtype for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point())


def _meta_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=dtype, device="meta")


def _stand_in(kernel: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """The forward of a quantized layer in the dry run: its kernel's dtype check and an empty
    result of ``out_features`` in the dtype it returns."""

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = getattr(self, "out_features", None)
        if not isinstance(out, int) or not isinstance(x, torch.Tensor):
            raise _Undecided(f"{type(self).__name__} has no out_features")
        if kernel is not None and x.dtype != kernel:
            raise RuntimeError(f"{type(self).__name__} expects {kernel} inputs, got {x.dtype}")
        return torch.empty((*x.shape[:-1], out), dtype=x.dtype if kernel is None else kernel, device="meta")

    return forward


class _LazyChildren(dict):  # type: ignore[type-arg]
    """A shadow's ``_modules``: it holds the real children and hands out their shadows, made on
    first access (``nn.Module.__getattr__``, ``ModuleList`` iteration and slicing, ``children``
    all go through ``[]``, ``get``, ``values`` or ``items``), so a dry run that stops at the first
    consumer shadows only the modules it reaches, not the whole model."""

    def __init__(self, shadow: _Shadow, children: Mapping[str, nn.Module | None], prefix: str) -> None:
        super().__init__(children)
        self._shadow = shadow
        self._prefix = prefix

    def __getitem__(self, key: str) -> nn.Module | None:
        child = super().__getitem__(key)
        return None if child is None else self._shadow(child, self._prefix + key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def values(self) -> list[nn.Module | None]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, nn.Module | None]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


class _Shadow:
    """Meta shadows of modules, made on first use: the same classes and attributes (shared, not
    copied), with parameters and buffers replaced by meta tensors of their planned dtypes, no
    hooks, no instance-level ``forward`` (accelerate's hook wrappers call the real module) and
    no compute-dtype rule of an earlier ``prepare`` (the plans whose inputs are checked add
    none). Each shadow is armed as it is made: a quantized layer gets a stand-in ``forward``
    (:func:`_stand_in`), and a module holding parameters records the first time it receives a
    floating tensor (the first consumer) and ends the run when that call returns."""

    def __init__(
        self,
        dtypes: Mapping[int, torch.dtype],
        storage: frozenset[int],
        kernel_of: Callable[[nn.Module], torch.dtype | None],
    ) -> None:
        self.dtypes = dtypes
        self.storage = storage
        self.kernel_of = kernel_of
        self.found: dict[str, Any] = {}
        self._memo: dict[int, nn.Module] = {}

    def __call__(self, module: nn.Module, name: str) -> nn.Module:
        found = self._memo.get(id(module))
        if found is not None:
            return found
        cls = getattr(type(module), _ORIGINAL, type(module))
        clone: nn.Module = cls.__new__(cls)
        self._memo[id(module)] = clone
        state: dict[str, Any] = {}
        for key, value in module.__dict__.items():
            if key in ("forward", _SPEC):
                continue
            state[key] = type(value)() if isinstance(value, dict) and "hooks" in key else value
        state["_parameters"] = {
            k: None if p is None else nn.Parameter(_meta_like(p, self.dtypes.get(id(p), p.dtype)), requires_grad=False)
            for k, p in module._parameters.items()
        }
        state["_buffers"] = {k: None if b is None else _meta_like(b, b.dtype) for k, b in module._buffers.items()}
        state["_modules"] = _LazyChildren(self, module._modules, f"{name}." if name else "")
        state["training"] = False
        clone.__dict__.update(state)
        self._arm(module, clone, name)
        return clone

    def _arm(self, module: nn.Module, clone: nn.Module, name: str) -> None:
        kernel = self.kernel_of(module)
        own = [p for p in module._parameters.values() if p is not None]
        if kernel is not None or any(id(p) in self.storage for p in own):  # a quantized layer: never run
            clone.__dict__["forward"] = _stand_in(kernel).__get__(clone)
        elif isinstance(module, nn.Embedding) or not own:  # embeddings read ids or positions only
            return
        found = self.found

        def before(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if "consumer" not in found and _floats((args, kwargs)):
                found.update(consumer=name, received=_floats((args, kwargs)), module=clone, call=(args, kwargs))

        def after(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if found.get("module") is clone:
                found["returned"] = _floats(output)
                raise _Stop

        clone.register_forward_pre_hook(before, with_kwargs=True)
        clone.register_forward_hook(after, with_kwargs=True)


def _example_shape(arg: str, owner: nn.Module) -> tuple[int, ...] | None:
    """A shape the module ``owner`` accepts for ``arg`` (read from its configuration), or None."""
    config = getattr(owner, "config", None)

    def get(*names: str) -> int | None:
        for n in names:
            value = getattr(config, n, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    if arg == "inputs_embeds":
        first = next((m for m in owner.modules() if isinstance(m, nn.Embedding)), None)
        hidden = first.embedding_dim if first is not None else get("hidden_size", "d_model", "n_embd")
        return None if hidden is None else (1, 2, hidden)
    if arg == "pixel_values":
        size = get("image_size")
        return None if size is None else (1, get("num_channels") or 3, size, size)
    if arg == "input_features":
        # WhisperEncoder.forward requires max_source_positions times its convolutions' strides
        mels, positions = get("num_mel_bins"), get("max_source_positions")
        strides = [m.stride[0] for m in owner.children() if isinstance(m, nn.Conv1d)]
        return None if mels is None or positions is None else (1, mels, positions * math.prod(strides))
    if arg == "input_values":
        return (1, 16000)  # one second of 16 kHz audio (wav2vec2-style feature encoders)
    return None


def _run(call: Callable[[], Any], found: dict[str, Any], *, strict: bool) -> Verdict:
    """Run ``call`` (a forward of shadows) until the first consumer has returned."""
    try:
        with torch.no_grad(), _OneDtypeOps() if strict else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except (_Stop, _Undecided):
        if "returned" not in found:
            raise
    except Exception as exc:  # a dtype error, or (in both runs) a forward that cannot run on meta
        return Verdict(found.get("consumer", ""), found.get("received", ()), (), f"{type(exc).__name__}: {exc}")
    return Verdict(found.get("consumer", ""), found.get("received", ()), found.get("returned", ()))


def _replay(found: dict[str, Any], old: torch.dtype, planned: torch.dtype) -> Verdict:
    """The first consumer's call again, its ``old`` floating tensors in ``planned``: what it
    does in the planned run, without running the model up to it a second time."""
    module: nn.Module = found["module"]
    args, kwargs = tree_map(
        lambda v: _meta_like(v, planned) if isinstance(v, torch.Tensor) and v.dtype == old else v, found["call"]
    )
    found.clear()
    return _run(lambda: module(*args, **kwargs), found, strict=False)


def dry_run_input(
    owner: nn.Module,
    owner_name: str,
    arg: str,
    dtypes: Mapping[int, torch.dtype],
    storage: frozenset[int],
    kernel_of: Callable[[nn.Module], torch.dtype | None],
    old: torch.dtype,
    planned: torch.dtype,
) -> tuple[Verdict, Verdict] | None:
    """Run ``owner`` (the deepest module whose ``forward`` takes ``arg``) on the meta device with
    ``arg`` in ``old`` and in ``planned``, up to its first consumer.

    Args:
        owner: The module to run (the model's; it is not changed).
        owner_name: Its name in the model (consumers are named from it).
        arg: The forward argument.
        dtypes: Planned dtype of each parameter, by ``id`` (missing: its current dtype).
        storage: ``id`` of every quantized-storage parameter.
        kernel_of: The strategy's ``input_dtype`` (a quantized layer's required input dtype).
        old: The input's dtype before preparation.
        planned: The dtype its first consumer computes in after preparation.

    Returns:
        The verdicts for ``old`` and ``planned``, or None when the dry run cannot decide (no
        example shape, a layer it cannot stand in for, the planned run failing too, or the two
        runs reaching different consumers).
    """
    try:
        shape = _example_shape(arg, owner)
    except Exception:  # a configuration that is not what it seems
        shape = None
    if shape is None:
        return None
    shadow = _Shadow(dtypes, storage, kernel_of)
    found = shadow.found
    try:
        root = shadow(owner, owner_name)
        example = torch.empty(shape, dtype=old, device="meta")
        before = _run(lambda: root(**{arg: example}), found, strict=True)
        if "call" in found and old not in before.received:  # converted on the way: as planned from here
            return before, before
        if "call" in found:  # it reached its first consumer in the old dtype: replay that call in the planned one
            after = _replay(found, old, planned)
        elif before.error is None:  # no module with parameters computes with it
            return before, before
        else:  # it failed on the way: does the planned dtype get through?
            found.clear()
            example = torch.empty(shape, dtype=planned, device="meta")
            after = _run(lambda: root(**{arg: example}), found, strict=True)
    except Exception as exc:  # _Stop / _Undecided out of place, or a module it cannot shadow: undecided
        logger.debug("dry run of %s(%s=...) undecided: %r", owner_name, arg, exc)
        return None
    if after.error is not None or (before.error is None and before.consumer != after.consumer):
        logger.debug("dry run of %s(%s=...) undecided: %s", owner_name, arg, after.error)
        return None
    return before, after
