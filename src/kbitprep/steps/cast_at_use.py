"""Modules that compute in another dtype than they store: the runtime side of the precision
model (planned by the compute step, :mod:`kbitprep.steps.compute`).

A module the plan lists in ``PreparationPlan.precision`` gets a subclass of its own class whose
``forward`` casts floating inputs to the module's compute dtype, brings parameters stored
narrower up to it for the duration of the call (as quantized layers dequantize at use; nothing
is stored), and, inside a repeated block, casts the output back to the activations' dtype.

The cast lives on the module's class and a plain instance attribute, not in hooks, so it
survives what users do after ``prepare``: ``copy.deepcopy``, peft's ``modules_to_save`` copies
and ``ensure_weight_tying``, LoRA wrapping (the wrapper calls the base layer), ``state_dict`` /
``save_pretrained`` (no parameter or buffer is added, keys are unchanged), and checkpointing's
recompute. ``undo`` gives the module its own class back.

Nothing here mutates module state during a forward (parameters are brought up functionally), so
``torch.compile`` traces a kept module like any other, checkpointed blocks included. The one
model-level forward pre-hook (:class:`_Adopt`) costs an attribute test per forward: it walks the
model only after a module or parameter was registered on one of its modules (torch's global
registration hooks tell it), never under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from kbitprep._errors import PrecisionWarning
from kbitprep._plan import CastItem, PreparationPlan, UndoLog
from kbitprep._storage import is_storage_dtype
from kbitprep.steps.context import bits

__all__ = ["ComputeSpec", "install_adopt", "install_spec", "spec_of"]

_SPEC = "_kbitprep_compute"
_ORIGINAL = "_kbitprep_original_class"


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
    weight is kept for the backward, which brings it up again for one product, the one autograd
    computes for a Linear stored in the compute dtype, so the input gradient is bit-identical too
    (a transient copy of the weight in the compute dtype while it runs).
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
            # one product over the whole weight, as autograd computes it for a Linear stored in
            # the compute dtype: summing row chunks would reorder the reduction over the output
            # features and change the last bits once there are more rows than one chunk
            grad_x = grad.matmul(weight.to(ctx.dtype))
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
        forward = getattr(type(self), _ORIGINAL).forward
        upcast: dict[str, torch.Tensor] = {}
        for name in spec.upcast:
            param = self._parameters.get(name)
            if param is not None and param.is_floating_point() and param.dtype != spec.dtype:
                upcast[name] = param.to(spec.dtype)
        if not upcast:
            return forward(self, *args, **kwargs)
        # the original forward reads the brought-up copies in place of the stored parameters;
        # torch.compile traces this swap as functional (no mutation leaks out of the call, so a
        # checkpointed block holding the module compiles whole), and it is undone on exit
        with _reparametrize_module(self, upcast):
            return forward(self, *args, **kwargs)


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
        f"{spec.name} is stored in {dtype} (kept low by prepare) and became trainable after the last forward "
        f"(e.g. peft set_adapter or requires_grad_ on an existing module): its updates are applied in {dtype}, "
        "which drops small steps. kbitprep stores a trainable copy at the upcast dtype when it is added (at the "
        "next forward); here, cast it yourself before training (param.data = param.data.float()), or leave the "
        "module out of keep_in_low_precision.",
        PrecisionWarning,
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


def install_spec(module: nn.Module, spec: ComputeSpec | None, log: UndoLog) -> None:
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


# -- what appears after prepare ------------------------------------------------------------------

# module -> the adoption hook of the model it was in at that hook's last walk (weakly on both
# sides, so a model and its hook are freed as usual): a module or parameter registered on one of
# these modules (peft's get_peft_model, add_adapter, ensure_weight_tying) marks that hook to walk
# again; registrations elsewhere (the temporary ModuleList a Llama forward slices its layers
# into, another model in the process) cost one dictionary look-up and change nothing
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType[_Adopt]] = weakref.WeakKeyDictionary()
_WATCHING: list[Any] = []  # the two registration-hook handles, once installed


def _is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(model)`` returns (read only when torch's
    compiler is already imported: it never is otherwise)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    return isinstance(wrapper, type) and isinstance(module, wrapper)


def _touch(parent: nn.Module) -> None:
    try:
        ref = _OWNERS.get(parent)
    except TypeError:  # a module class that made itself unhashable is never in the table
        return
    adopter = None if ref is None else ref()
    if adopter is not None:
        adopter.dirty = True


def _on_module_registered(parent: nn.Module, name: str, child: nn.Module) -> None:
    if name == "_orig_mod" and _is_compile_wrapper(parent):
        # torch.compile(model) / torch._dynamo.explain(model) wrap the model: what the next
        # forward would adopt is adopted now, eagerly, since the hook does nothing under compile
        _sync_pending(child)
        return
    _touch(parent)


def _on_parameter_registered(module: nn.Module, name: str, param: Any) -> None:
    _touch(module)


def _watch_registrations() -> None:
    """Install torch's process-wide registration hooks once (never removed). They cost one
    look-up per module or parameter registered anywhere in the process: a few microseconds per
    forward of a Llama, which re-registers its layers into a temporary ``ModuleList`` slice."""
    if not _WATCHING:
        hooks = torch.nn.modules.module
        _WATCHING.append(hooks.register_module_module_registration_hook(_on_module_registered))
        _WATCHING.append(hooks.register_module_parameter_registration_hook(_on_parameter_registered))


def _sync_pending(model: nn.Module) -> None:
    """Run every adoption hook in ``model`` that has registrations to look at."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, _Adopt) and hook.dirty:
                hook.sync(module)


def _put_back(hooks: dict[int, Any], key: int, hook: _Adopt) -> None:
    """Undo of taking an earlier ``prepare``'s hook off: it goes back, and walks at its next
    forward (registrations meanwhile were reported to the hook that replaced it)."""
    hook.dirty = True
    hooks[key] = hook


def _plain_float(param: Any) -> bool:
    """A plain ``nn.Parameter`` (no quantized-storage subclass) holding floats a module computes in."""
    return type(param) is nn.Parameter and param.is_floating_point() and not is_storage_dtype(param.dtype)


def _copies(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, copy, original) for each peft ``modules_to_save`` copy: a module holding an
    ``original_module`` and a ``modules_to_save`` ``ModuleDict`` of copies (peft is never
    imported)."""
    found: list[tuple[str, nn.Module, nn.Module]] = []
    for name, module in modules:
        copies = module._modules.get("modules_to_save")
        original = module._modules.get("original_module")
        if isinstance(copies, nn.ModuleDict) and original is not None:
            prefix = f"{name}.modules_to_save." if name else "modules_to_save."
            found.extend((prefix + key, copy_, original) for key, copy_ in copies.items())
    return found


def _store_as(param: nn.Parameter, dtype: torch.dtype) -> None:
    param.data = param.data.to(dtype)


class _Adopt:
    """Forward pre-hook on the model, for what appears after ``prepare``.

    - A plain ``nn.Linear`` / ``nn.Embedding`` with a weight stored below the compute dtype
      (peft builds such modules, e.g. the tied ``lm_head`` copy of ``modules_to_save`` with
      ``ensure_weight_tying``) gets the rule of the kept modules: it computes at the compute
      dtype, its weight brought up at use.
    - A trainable parameter stored below ``trainable`` (the plan's ``trainable_dtype``) in a
      module that computes wider than it stores (a kept module, a peft ``modules_to_save`` copy
      of one) or in a ``modules_to_save`` copy is cast to ``trainable`` in place, the same
      ``Parameter`` object, so an optimizer built before holds it still and first steps it at
      that dtype. The module then computes at its own dtype, its outputs in the dtype they had.

    Every change is recorded in the log, so ``undo`` reverts it with the rest; the casts are
    also listed in ``PreparationReport.trainable_casts``. The walk runs at the first forward and
    then only after a module or parameter was registered on a module of the model (peft's
    ``get_peft_model``, ``add_adapter``, ``ensure_weight_tying``), so a forward otherwise costs
    one attribute test; under ``torch.compile`` the hook does nothing (``torch.compile(model)``
    runs a pending walk eagerly when it wraps the model).
    """

    _kbitprep_hook = "adopt"

    def __init__(self, dtype: torch.dtype, trainable: torch.dtype | None, log: UndoLog) -> None:
        self.dtype = dtype
        self.trainable = trainable
        self.log = log  # each adoption is recorded, so ``undo`` reverts it with the rest
        self.dirty = True  # something to look at: the first forward always walks
        _watch_registrations()

    def __getstate__(self) -> dict[str, Any]:
        """Copied and pickled as not yet walked: the copy's modules are new objects."""
        return {**self.__dict__, "dirty": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _watch_registrations()

    def __call__(self, model: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or not self.dirty:
            return
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Walk ``model`` once: adopt new low-stored modules, store trainable copies wide, and
        note every module, so a registration on one of them brings the next walk."""
        self.dirty = False
        modules = list(model.named_modules())
        me = weakref.ref(self)
        for _name, module in modules:
            with contextlib.suppress(TypeError):  # an unhashable module class cannot be noted
                _OWNERS[module] = me
        copies = _copies(modules)
        for name, copy_, original in copies:
            self._like_original(name, copy_, original)
        for name, module in modules:
            self._adopt(name, module)
        if self.trainable is not None:
            in_copies = {id(m) for _n, copy_, _o in copies for m in copy_.modules()}
            self._store_trainable_wide(modules, in_copies, self.trainable)

    def _like_original(self, name: str, copy_: nn.Module, original: nn.Module) -> None:
        """A ``modules_to_save`` copy peft built anew rather than deep-copied (the tied
        ``lm_head`` of ``ensure_weight_tying``: a plain ``nn.Linear`` around the embedding
        copy's weight) computes as the module it stands for."""
        rule = spec_of(original)
        if rule is None or spec_of(copy_) is not None or type(copy_) not in (nn.Linear, nn.Embedding):
            return
        own = {leaf: q for leaf, q in copy_._parameters.items() if q is not None and _plain_float(q)}
        if "weight" not in own:
            return
        upcast = tuple(leaf for leaf, q in own.items() if q.dtype != rule.dtype)
        install_spec(copy_, ComputeSpec(name, rule.dtype, upcast, rule.output), self.log)

    def _adopt(self, name: str, module: nn.Module) -> None:
        if spec_of(module) is not None or type(module) not in (nn.Linear, nn.Embedding):
            return
        weight = module._parameters.get("weight")
        if weight is None or type(weight) is not nn.Parameter or not weight.is_floating_point():
            return
        if bits(weight.dtype) < bits(self.dtype):
            upcast = tuple(n for n, q in module._parameters.items() if q is not None and q.dtype != self.dtype)
            install_spec(module, ComputeSpec(name, self.dtype, upcast, None), self.log)

    def _store_trainable_wide(
        self, modules: list[tuple[str, nn.Module]], copies: set[int], target: torch.dtype
    ) -> None:
        holders: dict[int, list[tuple[str, nn.Module, str]]] = {}  # a tied parameter has several
        low: dict[int, nn.Parameter] = {}
        for name, module in modules:
            spec = spec_of(module)
            for leaf, param in module._parameters.items():
                if param is None:
                    continue
                holders.setdefault(id(param), []).append((name, module, leaf))
                wanted = (spec is not None and leaf in spec.upcast) or id(module) in copies
                if wanted and param.requires_grad and _plain_float(param) and bits(param.dtype) < bits(target):
                    low[id(param)] = param
        changed: dict[int, tuple[str, nn.Module, torch.dtype]] = {}
        for key, param in low.items():
            old = param.dtype
            names = [f"{n}.{leaf}" if n else leaf for n, _m, leaf in holders[key]]
            before = param.numel() * param.element_size()
            _store_as(param, target)
            self.log.add(functools.partial(_store_as, param, old))
            after = param.numel() * param.element_size()
            item = CastItem(names[0], tuple(param.shape), old, target, before, after, tuple(names[1:]))
            self.log.__dict__.setdefault("trainable_casts", []).append(item)  # an older pickle lacks it
            for name, module, _leaf in holders[key]:
                changed.setdefault(id(module), (name, module, old))
        for name, module, old in changed.values():
            self._recompute_rule(name, module, old)

    def _recompute_rule(self, name: str, module: nn.Module, stored: torch.dtype) -> None:
        """The rule of a module some of whose parameters were just stored wider (they were
        ``stored`` before): it computes at the widest of its old compute dtype and its
        parameters' dtypes, brings up only what is still narrower, and returns the dtype its
        outputs had (so the activations around it keep theirs)."""
        old = spec_of(module)
        before = stored if old is None else old.dtype
        own = {leaf: q for leaf, q in module._parameters.items() if q is not None and _plain_float(q)}
        dtype = max((before, *(q.dtype for q in own.values())), key=bits)
        upcast = tuple(leaf for leaf, q in own.items() if q.dtype != dtype)
        if old is not None and old.output is not None:
            output: torch.dtype | None = old.output
        else:
            output = before if dtype != before else None
        spec = ComputeSpec(name, dtype, upcast, output)
        if spec != old:
            install_spec(module, spec, self.log)


def install_adopt(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """One adoption hook per model: an earlier ``prepare``'s hook is taken off wherever it is
    (on the base model when this call gets the ``PeftModel`` around it), then this plan's added."""
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, _Adopt):
                del hooks[key]
                log.add(functools.partial(_put_back, hooks, key, hook))
    if p.precision and p.compute_dtype is not None:
        handle = model.register_forward_pre_hook(_Adopt(p.compute_dtype, p.trainable_dtype, log))
        log.add(handle.remove)
