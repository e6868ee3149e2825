"""Modules that compute in another dtype than they store: the runtime side of the precision
model (planned in :mod:`kbitprep._precision`).

A module the plan lists in ``PreparationPlan.precision`` gets a subclass of its own class whose
``forward`` casts floating inputs to the module's compute dtype, brings parameters stored
narrower up to it for the duration of the call (as quantized layers dequantize at use; nothing
is stored), and, inside a repeated block, casts the output back to the activations' dtype.

The cast lives on the module's class and a plain instance attribute, not in hooks, so it
survives what users do after ``prepare``: ``copy.deepcopy``, peft's ``modules_to_save`` copies
and ``ensure_weight_tying``, LoRA wrapping (the wrapper calls the base layer), ``state_dict`` /
``save_pretrained`` (no parameter or buffer is added, keys are unchanged), and checkpointing's
recompute. ``undo`` gives the module its own class back.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kbitprep._errors import KbitPrepWarning
from kbitprep._plan import PreparationPlan, UndoLog

__all__ = ["ComputeSpec", "apply_precision", "spec_of"]

_SPEC = "_kbitprep_compute"
_ORIGINAL = "_kbitprep_original_class"
_CHUNK_ROWS = 8192  # rows of a weight brought up at once in the backward of an upcast Linear


@dataclass(frozen=True, slots=True)
class ComputeSpec:
    """The compute-dtype rule of one module (kept on it as an instance attribute)."""

    name: str
    dtype: torch.dtype
    upcast: tuple[str, ...]
    output: torch.dtype | None


def spec_of(module: nn.Module) -> ComputeSpec | None:
    """The rule ``prepare`` put on ``module``, or ``None``."""
    spec = module.__dict__.get(_SPEC)
    return spec if isinstance(spec, ComputeSpec) else None


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class _UpcastLinear(torch.autograd.Function):
    """``F.linear`` with a weight stored narrower than the compute dtype.

    The forward brings the whole weight up once, so the result is bit-identical to a Linear
    stored in the compute dtype (bf16 → fp32 is exact), and frees it at once; only the stored
    weight is kept for the backward, which brings it up again in row chunks of
    ``_CHUNK_ROWS`` (at most 8192 × in_features elements at a time).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Any:
        out = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.dtype = dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, x if weight.requires_grad else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        weight, x = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            acc = torch.zeros(g2.shape[0], weight.shape[1], dtype=ctx.dtype, device=grad.device)
            for start in range(0, weight.shape[0], _CHUNK_ROWS):
                stop = start + _CHUNK_ROWS
                acc.addmm_(g2[:, start:stop], weight[start:stop].to(ctx.dtype))
            grad_x = acc.reshape(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1] and x is not None:
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(ctx.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class _ComputeAt(nn.Module):
    """The methods copied into the class of a module with a :class:`ComputeSpec`.

    They are copied into a one-base subclass (:func:`_subclass`) rather than mixed in: CPython
    refuses a ``__class__`` assignment to a class with a second base when the original class
    lays out its instance differently (optimum-quanto 0.2.7 ``QLinear``, whose ``abc.ABC`` mixin
    comes first: "object layout differs"), so they call the original class's ``forward``
    explicitly instead of ``super()``.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        spec = spec_of(self)
        if spec is None:
            return getattr(type(self), _ORIGINAL).forward(self, *args, **kwargs)
        args, kwargs = _cast(args, spec.dtype), _cast(kwargs, spec.dtype)
        if self.training:
            _warn_if_trainable_low(self, spec)
        original = getattr(type(self), _ORIGINAL)
        if original.forward is nn.Linear.forward and "weight" in spec.upcast:
            out = self._linear_at(spec, *args, **kwargs)
        elif original.forward is nn.Embedding.forward and "weight" in spec.upcast:
            out = self._embedding_at(spec, *args, **kwargs)
        else:
            out = self._generic_at(spec, *args, **kwargs)
        return out if spec.output is None else _cast(out, spec.output)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle as the original class, then put the rule back on load: the class made by
        :func:`_subclass` cannot be found by name, so ``torch.save(model)`` and ``pickle`` would
        refuse it."""
        return _rebuild, (getattr(type(self), _ORIGINAL),), self.__dict__.copy()

    def _linear_at(self, spec: ComputeSpec, x: torch.Tensor) -> torch.Tensor:
        linear: Any = self
        weight: torch.Tensor = linear.weight
        bias: torch.Tensor | None = linear.bias
        if weight.dtype == spec.dtype:
            return F.linear(x, weight, None if bias is None else bias.to(spec.dtype))
        out: torch.Tensor = _UpcastLinear.apply(x, weight, bias, spec.dtype)  # type: ignore[no-untyped-call]
        return out

    def _embedding_at(self, spec: ComputeSpec, ids: torch.Tensor) -> torch.Tensor:
        emb: Any = self
        # gather the rows, then bring only them up: exact, and no copy of the whole table
        rows = F.embedding(
            ids, emb.weight, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse
        )
        return rows.to(spec.dtype)

    def _generic_at(self, spec: ComputeSpec, *args: Any, **kwargs: Any) -> Any:
        saved: dict[str, Any] = {}
        for name in spec.upcast:
            param = self._parameters.get(name)
            if param is not None and param.is_floating_point() and param.dtype != spec.dtype:
                saved[name] = param
                self._parameters[name] = param.to(spec.dtype)  # type: ignore[assignment]
        try:
            return getattr(type(self), _ORIGINAL).forward(self, *args, **kwargs)
        finally:
            self._parameters.update(saved)


def _warn_if_trainable_low(module: nn.Module, spec: ComputeSpec) -> None:
    if module.__dict__.get("_kbitprep_warned"):
        return
    low = [
        n
        for n in spec.upcast
        if (p := module._parameters.get(n)) is not None and p.requires_grad and torch.finfo(p.dtype).bits < 32
    ]
    if not low:
        return
    module.__dict__["_kbitprep_warned"] = True
    dtype = module._parameters[low[0]].dtype  # type: ignore[union-attr]
    warnings.warn(
        f"{spec.name} is stored in {dtype} (kept low by prepare) and is now trainable, for example as a "
        f"peft modules_to_save copy: its updates are applied in {dtype}, which drops small steps. Leave it "
        f"out of keep_in_low_precision, or cast the trainable copy to torch.float32 before training.",
        KbitPrepWarning,
        stacklevel=3,
    )


_SUBCLASSES: dict[type, type] = {}


def _subclass(cls: type) -> type:
    """``cls`` with :class:`_ComputeAt`'s methods (one per class, same name, one base: ``cls``)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        methods = {k: v for k, v in vars(_ComputeAt).items() if callable(v) and not k.startswith("__")}
        methods["__reduce_ex__"] = _ComputeAt.__reduce_ex__
        attrs = {**methods, _ORIGINAL: cls, "__module__": cls.__module__, "__doc__": cls.__doc__}
        sub = _SUBCLASSES[cls] = type(cls.__name__, (cls,), attrs)
    return sub


def _rebuild(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``cls`` with the compute-dtype rule's class (unpickling; the state,
    the rule's spec included, is set afterwards by ``nn.Module.__setstate__``)."""
    module = cls.__new__(cls)
    object.__setattr__(module, "__class__", _subclass(cls))
    return module


def _install(module: nn.Module, spec: ComputeSpec | None, log: UndoLog) -> None:
    old_spec = spec_of(module)
    old_class = type(module)
    if spec is None:
        module.__dict__.pop(_SPEC, None)
        module.__class__ = getattr(old_class, _ORIGINAL, old_class)
    else:
        module.__dict__[_SPEC] = spec
        if getattr(old_class, _ORIGINAL, None) is None:
            module.__class__ = _subclass(old_class)
    log.add(functools.partial(_restore, module, old_class, old_spec))


def _restore(module: nn.Module, cls: type, spec: ComputeSpec | None) -> None:
    module.__class__ = cls
    if spec is None:
        module.__dict__.pop(_SPEC, None)
    else:
        module.__dict__[_SPEC] = spec


def _dtype(text: str) -> torch.dtype:
    value = getattr(torch, text.removeprefix("torch."))
    assert isinstance(value, torch.dtype)
    return value


class _Adopt:
    """Forward pre-hook on the model: a plain ``nn.Linear`` / ``nn.Embedding`` that appeared
    after ``prepare`` with a weight stored below the compute dtype (peft builds such modules, e.g.
    the tied ``lm_head`` copy of ``modules_to_save`` with ``ensure_weight_tying``) gets the same
    rule as the kept modules: it computes at the compute dtype, its weight brought up at use."""

    _kbitprep_hook = "adopt"

    def __init__(self, dtype: torch.dtype, log: UndoLog) -> None:
        self.dtype = dtype
        self.log = log  # each adoption is recorded, so ``undo`` reverts it with the rest

    def __call__(self, model: nn.Module, args: Any) -> None:
        for name, module in model.named_modules():
            if spec_of(module) is not None or type(module) not in (nn.Linear, nn.Embedding):
                continue
            weight = module._parameters.get("weight")
            if weight is None or type(weight) is not nn.Parameter or not weight.is_floating_point():
                continue
            if torch.finfo(weight.dtype).bits < torch.finfo(self.dtype).bits:
                upcast = tuple(n for n, q in module._parameters.items() if q is not None and q.dtype != self.dtype)
                _install(module, ComputeSpec(name, self.dtype, upcast, None), self.log)


def _install_adopt(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """One adoption hook per model: an earlier ``prepare``'s hook is taken off wherever it is
    (on the base model when this call gets the ``PeftModel`` around it), then this plan's added."""
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, _Adopt):
                del hooks[key]
                log.add(functools.partial(hooks.__setitem__, key, hook))
    if p.precision and p.compute_dtype is not None:
        handle = model.register_forward_pre_hook(_Adopt(_dtype(p.compute_dtype), log))
        log.add(handle.remove)


def apply_precision(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """Give every module in ``p.precision`` its compute-dtype rule, and take it from any module
    an earlier ``prepare`` gave one that this plan does not list (so repeated prepares with
    other options never leave a stale rule)."""
    wanted = {m.name: m for m in p.precision}
    for name, module in model.named_modules():
        row = wanted.get(name)
        if row is None:
            if spec_of(module) is not None:
                _install(module, None, log)
            continue
        spec = ComputeSpec(
            name,
            _dtype(row.computes),
            row.upcast_at_use,
            None if row.output_to is None else _dtype(row.output_to),
        )
        if spec_of(module) != spec:
            _install(module, spec, log)
    _install_adopt(model, p, log)
