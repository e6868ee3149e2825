"""The orchestrator: ``plan`` decides, ``prepare`` applies, ``PreparationReport.undo`` reverts.

resolve backend → check_trainable → before_training → freeze → cast → checkpoint. Every
decision is made in :func:`plan` before anything changes; each apply step records what
:meth:`PreparationReport.undo` needs, and skips work already done, so a second call changes
nothing.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeAlias

import torch
from torch import nn

from kbitprep import _checkpointing as ckpt
from kbitprep import _distributed
from kbitprep import _hf as _integrations
from kbitprep._errors import InvalidArgumentError, InvalidModelError, KbitPrepWarning
from kbitprep._hf import adapter_param_ids as _adapter_param_ids
from kbitprep._hf import unwrap_model
from kbitprep._registry import detect_backend, get_backend
from kbitprep.backends.base import QuantBackend, is_wrapper_subclass, tensor_nbytes

__all__ = [
    "CastItem",
    "PreparationPlan",
    "PreparationReport",
    "UpcastPolicy",
    "plan",
    "prepare",
    "prepare_model_for_kbit_training",
]

logger = logging.getLogger(__name__)

UpcastPolicy: TypeAlias = "Literal['auto', 'all', 'none'] | Callable[[str, nn.Parameter, nn.Module], bool]"

_UPCAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# casts from these to a wider float are exact, so undo casts back instead of keeping copies
_WIDENING = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}


@dataclass(frozen=True, slots=True)
class CastItem:
    """One parameter the plan casts.

    Attributes:
        name: Parameter name (the first one when it is tied).
        shape: Its shape.
        from_dtype: Current dtype, e.g. ``"torch.bfloat16"`` (as ``str(dtype)``).
        to_dtype: Target dtype.
        bytes_before: Storage bytes now (numel × element size).
        bytes_after: Storage bytes after the cast.
        tied: Other names of the same parameter (tied weights are cast once).
    """

    name: str
    shape: tuple[int, ...]
    from_dtype: str
    to_dtype: str
    bytes_before: int
    bytes_after: int
    tied: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PreparationPlan:
    """What :func:`prepare` will do (or, for a report, did), decided without changing anything.

    Attributes:
        backend: Registry name of the strategy used.
        reason: Why that backend was chosen (the evidence, or ``"backend='x' was passed"``).
        casts: The parameter casts, in model order.
        frozen: Base (non-adapter) parameters that end with ``requires_grad=False``.
        kept_trainable: Names of adapter parameters left trainable.
        gradient_checkpointing: Whether checkpointing is on after preparation.
        use_reentrant: The ``use_reentrant`` checkpointing uses; None when it is off.
        input_grad_hook: Whether the input embeddings' outputs are made to require grad
            (reentrant checkpointing only).
        bytes_delta: Change in parameter storage, bytes (a tied parameter counts once).
        warnings: Findings to read before training.
        input_grad_modules: Modules whose output is made to require grad.
        input_casts: ``(module name, dtype)`` of modules whose floating inputs are cast to their
            own dtype because the plan leaves the model in mixed dtypes.
        output_casts: Modules among ``input_casts`` inside a repeated block (an element of an
            ``nn.ModuleList``, e.g. a decoder layer) whose output is cast back to the dtype of the
            input they were given, so every activation inside a block keeps the block's dtype and
            functional ops that mix them (RoPE's cos/sin with q/k, SDPA's q/k/v) never see two
            dtypes (C03). Modules outside blocks (final norm, ``lm_head``) return their own dtype,
            so the output dtypes follow the plan (C04).
        use_cache_off: Whether ``config.use_cache`` is turned off (it is, while checkpointing
            and in the distributed mode).
        distributed: ``"fsdp"`` when the distributed (FSDP) mode is on, else ``None``.
        shard_dtype: In the distributed mode, the one dtype of every floating parameter (e.g.
            ``"torch.bfloat16"``, the bitsandbytes ``quant_storage``); cast the adapters to it
            with :func:`kbitprep.cast_adapters`.
    """

    backend: str
    reason: str
    casts: tuple[CastItem, ...]
    frozen: int
    kept_trainable: tuple[str, ...]
    gradient_checkpointing: bool
    use_reentrant: bool | None
    input_grad_hook: bool
    bytes_delta: int
    warnings: tuple[str, ...]
    input_grad_modules: tuple[str, ...] = ()
    input_casts: tuple[tuple[str, str], ...] = ()
    output_casts: tuple[str, ...] = ()
    use_cache_off: bool = False
    distributed: str | None = None
    shard_dtype: str | None = None
    _options: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-serialisable data (dtypes as strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name == "casts":
                value = [{**asdict(c), "shape": list(c.shape), "tied": list(c.tied)} for c in value]
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.reason})"]
        if self.casts:
            width = max(len(c.name) for c in self.casts)
            lines.append(
                f"  {'parameter':<{width}}  {'shape':<14} {'from':<15} {'to':<15} {'bytes before':>13} {'bytes after':>12}"
            )
            for c in self.casts:
                shape = "x".join(str(s) for s in c.shape) or "()"
                lines.append(
                    f"  {c.name:<{width}}  {shape:<14} {c.from_dtype:<15} {c.to_dtype:<15} "
                    f"{c.bytes_before:>13,} {c.bytes_after:>12,}"
                )
        else:
            lines.append("  casts: none")
        lines.append(f"bytes delta: {self.bytes_delta:+,}")
        lines.append(f"frozen parameters: {self.frozen}; adapters kept trainable: {len(self.kept_trainable)}")
        reentrant = "-" if self.use_reentrant is None else str(self.use_reentrant)
        lines.append(
            f"gradient checkpointing: {'on' if self.gradient_checkpointing else 'off'}; "
            f"use_reentrant: {reentrant}; input-grad hook: {'yes' if self.input_grad_hook else 'no'}"
        )
        if self.input_casts:
            lines.append(f"input casts at {len(self.input_casts)} module(s) kept in another dtype")
        if self.distributed:
            lines.append(f"distributed: {self.distributed}; every floating parameter in {self.shard_dtype}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


# -- the undo log ---------------------------------------------------------------------------


class _UndoLog:
    """Every mutation ``prepare`` made, in order; ``undo`` reverts them last-first.

    The logs of one model form a stack: undoing a report first undoes every later report on the
    same model, so reports undone out of order still bring the model back to its state before
    the report being undone.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._entries: list[Callable[[], object]] = []
        self._stack: list[_UndoLog] | None = None
        if model is not None:
            self._stack = _LOG_STACKS.setdefault(model, [])
            self._stack.append(self)

    def add(self, fn: Callable[[], object]) -> None:
        self._entries.append(fn)

    def undo(self) -> None:
        stack = self._stack
        if stack is not None and self in stack:
            while stack and stack[-1] is not self:
                stack.pop()._revert()
            stack.pop()
        self._revert()

    def _revert(self) -> None:
        while self._entries:
            self._entries.pop()()


_LOG_STACKS: weakref.WeakKeyDictionary[nn.Module, list[_UndoLog]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class PreparationReport(PreparationPlan):
    """The plan as applied by :func:`prepare`, plus :meth:`undo`."""

    _log: _UndoLog = field(default_factory=_UndoLog, repr=False, compare=False)

    @classmethod
    def from_plan(cls, p: PreparationPlan, log: _UndoLog) -> PreparationReport:
        values = {f.name: getattr(p, f.name) for f in fields(p)}
        return cls(**values, _log=log)

    def undo(self) -> None:
        """Revert everything :func:`prepare` changed: dtypes (bit-exact), ``requires_grad``,
        the hooks it added, checkpointing and ``config.use_cache``, and backend fix-ups.
        Calling it again does nothing."""
        self._log.undo()


# -- options --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Options:
    use_gradient_checkpointing: bool
    checkpoint_kwargs: dict[str, Any]
    kwargs_given: bool
    backend: str
    upcast: Any
    upcast_dtype: torch.dtype
    keep: tuple[str, ...]
    distributed: Any = None


def _options(
    use_gradient_checkpointing: object,
    gradient_checkpointing_kwargs: object,
    backend: object,
    upcast: object,
    upcast_dtype: object,
    keep_in_low_precision: object,
    distributed: object = None,
) -> _Options:
    if not isinstance(use_gradient_checkpointing, bool):
        raise InvalidArgumentError(
            f"use_gradient_checkpointing must be True or False; got {use_gradient_checkpointing!r}."
        )
    kwargs = ckpt.resolve_kwargs(gradient_checkpointing_kwargs)
    if not isinstance(backend, str):
        raise InvalidArgumentError(f"backend must be 'auto' or a backend name (str); got {backend!r}.")
    if not (upcast in ("auto", "all", "none") or callable(upcast)):
        raise InvalidArgumentError(
            f"upcast must be 'auto', 'all', 'none' or a callable (name, param, module) -> bool; got {upcast!r}."
        )
    if not isinstance(upcast_dtype, torch.dtype) or upcast_dtype not in _UPCAST_DTYPES:
        raise InvalidArgumentError(
            f"upcast_dtype must be one of torch.float32, torch.float64, torch.bfloat16, torch.float16 "
            f"(a compute dtype parameters can be kept in; float8 types cannot); got {upcast_dtype!r}."
        )
    if isinstance(keep_in_low_precision, str):
        keep: tuple[str, ...] = (keep_in_low_precision,)
    else:
        try:
            keep = tuple(keep_in_low_precision)  # type: ignore[call-overload,arg-type]
        except TypeError:
            raise InvalidArgumentError(
                f"keep_in_low_precision must be a sequence of name patterns such as ('lm_head',); "
                f"got {keep_in_low_precision!r}."
            ) from None
        if not all(isinstance(k, str) and k for k in keep):
            raise InvalidArgumentError(
                f"keep_in_low_precision must hold non-empty strings (module or parameter names, "
                f"globs allowed); got {keep!r}."
            )
    return _Options(
        use_gradient_checkpointing,
        kwargs,
        gradient_checkpointing_kwargs is not None,
        backend,
        upcast,
        upcast_dtype,
        keep,
        _distributed.validate(distributed),
    )


# -- inventory ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Param:
    names: list[str]
    param: nn.Parameter
    module: nn.Module
    storage: bool = False
    adapter: bool = False


def _inventory(model: nn.Module, backend: QuantBackend) -> list[_Param]:
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, _Param] = {}
    adapters = _adapter_param_ids(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        entry = by_id.get(id(param))
        if entry is not None:
            entry.names.append(name)
            continue
        owner = modules.get(name.rpartition(".")[0], model)
        entry = _Param([name], param, owner)
        entry.adapter = id(param) in adapters
        entry.storage = not entry.adapter and backend.is_quantized_param(name, param, owner)
        by_id[id(param)] = entry
    return list(by_id.values())


def _matches(pattern: str, names: Iterable[str]) -> bool:
    for name in names:
        module = name.rpartition(".")[0]
        for candidate in (name, module):
            if candidate == pattern or candidate.endswith("." + pattern) or fnmatch.fnmatchcase(candidate, pattern):
                return True
    return False


# -- plan -----------------------------------------------------------------------------------


def _validate_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"Expected a torch.nn.Module (e.g. the model from AutoModelForCausalLM.from_pretrained); "
            f"got {type(model).__name__}. Pass the model object, not its name or state dict."
        )
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise InvalidModelError(
            f"{len(meta)} parameter(s) are on the meta device (first: {meta[0]!r}), so they hold no "
            "data to freeze or cast. Load the weights first (from_pretrained without "
            "low_cpu_mem_usage tricks, or load_state_dict(..., assign=True)), or, for device_map "
            "offloading, keep the offloaded modules off the meta device."
        )
    return model


def _resolve_backend(base: nn.Module, name: str) -> tuple[QuantBackend, str, list[str]]:
    if name == "auto":
        detection = detect_backend(base)
        notes = [
            f"backend {other!r} also claims this model ({why}); {detection.backend!r} has the higher priority"
            for other, why in detection.others
        ]
        return get_backend(detection.backend), detection.reason, notes
    backend = get_backend(name)
    detected = detect_backend(base)
    notes = []
    if detected.backend != name:
        notes.append(
            f"backend={name!r} was passed, but the model looks like {detected.backend!r} ({detected.reason}); "
            f"the {name!r} policy is applied as asked. Pass backend='auto' to use the detected one."
        )
    return backend, f"backend={name!r} was passed", notes


def _module_dtype(module: nn.Module, final: Mapping[int, torch.dtype], storage: set[int]) -> torch.dtype | None:
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in storage and p.is_floating_point()]
    if not own:
        return None
    for n, p in own:
        if n == "weight":
            return final.get(id(p), p.dtype)
    return final.get(id(own[0][1]), own[0][1].dtype)


def plan(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "auto",
    upcast: Any = "auto",
    upcast_dtype: torch.dtype = torch.float32,
    keep_in_low_precision: Iterable[str] = (),
    distributed: _distributed.DistributedMode = None,
) -> PreparationPlan:
    """Decide how to prepare ``model`` for k-bit adapter training; change nothing.

    No parameter, dtype, ``requires_grad``, hook, checkpointing flag or ``use_cache`` is
    touched, no forward is run, and no parameter storage is allocated.

    Args:
        model: Quantized model on any device (CPU, CUDA, mixed); a ``peft.PeftModel`` is
            looked through.
        use_gradient_checkpointing: Turn gradient (activation) checkpointing on. Default True,
            as peft 0.21. An explicit False always wins over the backend's preference; the
            unquantized backend leaves it as the model has it, as peft does.
        gradient_checkpointing_kwargs: Passed to ``torch.utils.checkpoint.checkpoint``.
            ``use_reentrant`` is always passed explicitly: yours, else ``False``.
        backend: ``"auto"`` (detect) or a registered backend name.
        upcast: ``"auto"`` (the backend's policy: peft's fp16/bf16 → fp32 for bitsandbytes and
            unquantized models, nothing for gptq, aqlm, eetq, hqq, torchao), ``"all"`` (every
            non-quantized floating parameter), ``"none"``, or a callable
            ``(name, param, module) -> bool``.
        upcast_dtype: Floating dtype to upcast to. Default ``torch.float32``, as peft 0.21.
        keep_in_low_precision: Module or parameter name patterns (exact, dotted suffix, or
            fnmatch glob) never cast, e.g. ``("lm_head", "embed_tokens")``. Their inputs are
            cast to their own dtype so no dtype mismatch appears mid-network.
        distributed: ``None`` (default: single-process behaviour, as peft), ``"fsdp"`` (the model
            will be sharded with FSDP1 ``FullyShardedDataParallel`` or FSDP2 ``fully_shard``), or
            ``"auto"`` (``"fsdp"`` when ``ACCELERATE_USE_FSDP`` is set or a process group of
            several ranks is initialised, and the quantized storage is a float dtype, e.g.
            ``bnb_4bit_quant_storage=torch.bfloat16``). In the distributed mode every floating
            parameter ends in one dtype (``shard_dtype``: the storage's float dtype, else the
            dtype holding most bytes), nothing is upcast, checkpointing is non-reentrant and
            ``use_cache`` is turned off. See docs/distributed.md.

    Returns:
        The plan. ``bytes_delta`` is in bytes; a tied parameter counts once.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` or has meta-device parameters.
        InvalidArgumentError: An option has the wrong type or value.
        UnknownBackendError: ``backend`` names no registered backend.
        BackendUnavailableError: The backend's library is not installed (pip hint included).
        NotTrainableError: The backend says adapters cannot train (e.g. torchao dynamic
            activation quantization, transformers ``HfQuantizer.is_trainable`` False).
        NotShardableError: ``distributed="fsdp"`` and the backend's ``shardable(model)`` says
            FSDP cannot shard its quantized storage.
    """
    model = _validate_model(model)
    opts = _options(
        use_gradient_checkpointing,
        gradient_checkpointing_kwargs,
        backend,
        upcast,
        upcast_dtype,
        keep_in_low_precision,
        distributed,
    )
    base = unwrap_model(model)
    strategy, reason, notes = _resolve_backend(base, opts.backend)
    strategy.check_trainable(base)
    found: list[str] = list(notes)
    found.extend(strategy.plan_warnings(base))

    inventory = _inventory(model, strategy)
    storage_ids = {id(e.param) for e in inventory if e.storage}
    decision = _distributed.resolve(
        opts.distributed,
        strategy,
        base,
        [e.param for e in inventory if e.storage],
        [e.param for e in inventory if not e.storage and not e.adapter and e.param.is_floating_point()],
        found,
    )
    dist_on, shard_dtype = decision.mode is not None, decision.shard_dtype
    if dist_on and opts.upcast not in ("auto", "none"):
        raise InvalidArgumentError(
            f"upcast={opts.upcast!r} cannot be combined with distributed={opts.distributed!r}: the "
            f"distributed mode keeps every floating parameter in one dtype ({shard_dtype}) so FSDP can "
            "shard it. Leave upcast at 'auto'."
        )
    if dist_on and opts.use_gradient_checkpointing and opts.checkpoint_kwargs["use_reentrant"]:
        raise InvalidArgumentError(
            f"use_reentrant=True cannot be combined with distributed={opts.distributed!r}: FSDP needs "
            "non-reentrant checkpointing. Pass gradient_checkpointing_kwargs={'use_reentrant': False} "
            "or leave it out."
        )

    # freeze
    adapters = [e for e in inventory if e.adapter]
    kept = tuple(n for e in adapters for n in e.names)
    frozen = sum(1 for e in inventory if not e.adapter)
    if adapters:
        found.append(
            f"{len(kept)} adapter parameter(s) are already attached (first: {kept[0]!r}) and stay "
            "trainable. The usual order is prepare, then attach adapters (get_peft_model)."
        )

    # cast
    casts: list[CastItem] = []
    final: dict[int, torch.dtype] = {}
    matched: set[str] = set()
    for e in inventory:
        p = e.param
        final[id(p)] = p.dtype
        if e.storage or e.adapter or not p.is_floating_point():
            continue
        kept_low = False
        for pattern in opts.keep:
            if _matches(pattern, e.names):
                matched.add(pattern)
                kept_low = True
        if kept_low:
            continue
        if dist_on:  # one dtype for FSDP: cast only what differs from it, never upcast
            if shard_dtype is not None and p.dtype != shard_dtype:
                casts.append(
                    CastItem(
                        e.names[0],
                        tuple(p.shape),
                        str(p.dtype),
                        str(shard_dtype),
                        tensor_nbytes(p),
                        p.numel() * torch.empty((), dtype=shard_dtype).element_size(),
                        tuple(e.names[1:]),
                    )
                )
                final[id(p)] = shard_dtype
            continue
        name = e.names[0]
        if opts.upcast == "auto":
            wanted = strategy.should_upcast(name, p, e.module)
        elif opts.upcast == "all":
            wanted = True
        elif opts.upcast == "none":
            wanted = False
        else:
            wanted = bool(opts.upcast(name, p, e.module))
        if not wanted or p.dtype == opts.upcast_dtype:
            continue
        after = p.numel() * torch.empty((), dtype=opts.upcast_dtype).element_size()
        casts.append(
            CastItem(
                name,
                tuple(p.shape),
                str(p.dtype),
                str(opts.upcast_dtype),
                tensor_nbytes(p),
                after,
                tuple(e.names[1:]),
            )
        )
        final[id(p)] = opts.upcast_dtype
    for pattern in opts.keep:
        if pattern not in matched:
            found.append(
                f"keep_in_low_precision pattern {pattern!r} matches no parameter; check the name "
                "against model.named_parameters() (exact name, dotted suffix such as 'lm_head', or a glob)."
            )
    bytes_delta = sum(c.bytes_after - c.bytes_before for c in casts)
    if (
        casts
        and opts.upcast == "all"
        and not any(
            strategy.should_upcast(e.names[0], e.param, e.module)
            for e in inventory
            if not e.storage and e.param.is_floating_point()
        )
        and strategy.name not in ("none",)
    ):
        found.append(
            f"upcast='all' on a {strategy.name} model: its quantized kernels expect their own compute "
            "dtype; kbitprep casts the inputs of those layers back to it, but the upcast costs "
            f"{bytes_delta:,} bytes for no accuracy the kernels can use."
        )
    if strategy.name == "none" and bytes_delta > 0 and not dist_on:
        found.append(
            f"{'The model is not quantized' if opts.backend == 'auto' else 'backend=none treats the model as unquantized'}; "
            f"upcasting {len(casts)} parameter(s) to {opts.upcast_dtype} adds "
            f"{bytes_delta:,} bytes ({bytes_delta} bytes), as peft does. Pass upcast='none' to keep "
            "the model's dtype."
        )

    # input casts where dtypes end mixed
    input_casts: list[tuple[str, str]] = []
    floating_final = {
        final[id(e.param)] for e in inventory if not e.storage and not e.adapter and e.param.is_floating_point()
    }
    layer_dtypes: list[tuple[str, torch.dtype]] = []
    for mname, module in base.named_modules():
        dt = strategy.input_dtype(module)
        if dt is not None:
            layer_dtypes.append((mname, dt))
    if len(floating_final | {d for _n, d in layer_dtypes}) > 1:
        prefix = _prefix_of(model, base)
        seen: set[str] = set()
        for mname, dt in layer_dtypes:
            input_casts.append((prefix + mname, str(dt)))
            seen.add(mname)
        for mname, module in base.named_modules():
            if mname in seen or isinstance(module, nn.Embedding):
                continue
            dt2 = _module_dtype(module, final, storage_ids)
            if dt2 is not None and _takes_float_input(module):
                input_casts.append((prefix + mname, str(dt2)))
    in_blocks = _names_in_blocks(model)
    output_casts = tuple(n for n, _d in input_casts if n in in_blocks)

    # checkpointing
    gc = opts.use_gradient_checkpointing and strategy.wants_gradient_checkpointing(base)
    already = ckpt.is_enabled(base)
    use_reentrant: bool | None = None
    if gc and not ckpt.supports(base) and not already:
        found.append(
            f"{type(base).__name__} has no gradient checkpointing switch (no "
            "activation_checkpointing_enable / gradient_checkpointing_enable, or "
            "supports_gradient_checkpointing is False); checkpointing stays off, so activations "
            "use more memory. Pass use_gradient_checkpointing=False to silence this."
        )
        gc = False
    kept_on = not gc and already
    if gc:
        if strategy.name == "none" and already and not opts.kwargs_given:
            use_reentrant = ckpt.current_use_reentrant(base)
        else:
            use_reentrant = bool(opts.checkpoint_kwargs["use_reentrant"])
    elif kept_on:
        # checkpointing someone already turned on stays on, in its mode, and is reported as on; it
        # gets the input-grad wiring reentrant checkpointing needs (transformers 4.57's
        # gradient_checkpointing_enable adds none), else adapters inside it get no gradient
        gc = True
        use_reentrant = ckpt.current_use_reentrant(base)
        found.append(
            f"Gradient checkpointing was already on (use_reentrant={use_reentrant}) and stays on: "
            "kbitprep does not turn it off. Call model.gradient_checkpointing_disable() "
            "(activation_checkpointing_disable on transformers 5) before prepare if you want it off."
        )
    elif strategy.name == "none" and opts.use_gradient_checkpointing:
        found.append(
            "Gradient checkpointing left off because the model is not quantized (as peft does). "
            "Turn it on with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}) (activation_checkpointing_enable on transformers 5) if you need it."
        )
    entries = ckpt.entry_modules(base) if gc and use_reentrant else []
    if gc and use_reentrant and not entries:
        found.append(
            "Reentrant checkpointing was requested but the model has no input embedding module "
            "(get_input_embeddings is missing or fails, and there is no nn.Embedding): adapters "
            "inside checkpointed blocks will get no gradient. Use use_reentrant=False."
        )
    prefix = _prefix_of(model, base)
    use_cache = getattr(getattr(base, "config", None), "use_cache", None)

    return PreparationPlan(
        backend=strategy.name,
        reason=reason,
        casts=tuple(casts),
        frozen=frozen,
        kept_trainable=kept,
        gradient_checkpointing=gc,
        use_reentrant=use_reentrant,
        input_grad_hook=bool(entries),
        bytes_delta=bytes_delta,
        warnings=tuple(found),
        input_grad_modules=tuple(prefix + n for n, _m in entries),
        input_casts=tuple(input_casts),
        output_casts=output_casts,
        use_cache_off=((gc and not kept_on) or dist_on) and use_cache is True,
        distributed="fsdp" if dist_on else None,
        shard_dtype=str(shard_dtype) if shard_dtype is not None else None,
        _options=opts,
    )


def _prefix_of(model: nn.Module, base: nn.Module) -> str:
    if model is base:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return f"{name}."
    return ""


def _names_in_blocks(model: nn.Module) -> set[str]:
    """Names of the modules inside a repeated block: below an element of an ``nn.ModuleList``."""
    names: set[str] = set()
    for lname, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, block in module.named_children():
                head = f"{lname}.{index}" if lname else index
                names.update(f"{head}.{n}" if n else head for n, _m in block.named_modules())
    return names


def _takes_float_input(module: nn.Module) -> bool:
    # containers and norms are skipped only when they own no parameters; any module with its own
    # floating parameters may be fed activations of another dtype
    return not isinstance(module, (nn.Embedding, nn.EmbeddingBag))


# -- apply ----------------------------------------------------------------------------------


class _InputCast:
    """Forward pre-hook: cast floating tensor inputs to the module's own dtype (C03)."""

    _kbitprep_hook = "input_cast"

    def __init__(self, dtype: torch.dtype, restore_output: bool = False) -> None:
        self.dtype = dtype
        self.restore_output = restore_output
        self._given: list[torch.dtype | None] = []  # one entry per forward in flight

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        dtype = self.dtype
        if self.restore_output:
            given = next(
                (x.dtype for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.is_floating_point()),
                None,
            )
            self._given.append(given)

        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
                return x.to(dtype)
            return x

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


class _OutputCast:
    """Forward hook paired with an :class:`_InputCast`: cast floating outputs back to the dtype
    the module was given (modules inside repeated blocks, see ``PreparationPlan.output_casts``)."""

    _kbitprep_hook = "output_cast"

    def __init__(self, pre: _InputCast) -> None:
        self.pre = pre

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        given = self.pre._given.pop() if self.pre._given else None
        if given is None:
            return output

        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != given:
                return x.to(given)
            return x

        if isinstance(output, tuple) and not hasattr(output, "_fields"):
            return tuple(cast(o) for o in output)
        return cast(output)


def _has_input_cast(module: nn.Module) -> bool:
    return any(getattr(h, "_kbitprep_hook", None) == "input_cast" for h in module._forward_pre_hooks.values())


def _apply_before_training(model: nn.Module, strategy: QuantBackend, log: _UndoLog) -> None:
    undo = strategy.before_training(model)
    if undo is not None:
        log.add(undo)


def _apply_freeze(model: nn.Module, inventory: list[_Param], log: _UndoLog) -> None:
    for e in inventory:
        if e.adapter or not e.param.requires_grad:
            continue
        e.param.requires_grad_(False)
        log.add(functools.partial(e.param.requires_grad_, True))


def _apply_casts(model: nn.Module, p: PreparationPlan, log: _UndoLog) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in p.casts:
        param = params[c.name]
        to = _dtype(c.to_dtype)
        if param.dtype == to:
            continue
        old = param.dtype
        if to in _WIDENING.get(old, ()):
            param.data = param.data.to(to)
            log.add(functools.partial(_cast_data, param, old))
        else:  # a narrowing or sideways cast is not exact: keep the original to restore
            original = param.data
            param.data = param.data.to(to)
            log.add(functools.partial(setattr, param, "data", original))


def _cast_data(param: nn.Parameter, dtype: torch.dtype) -> None:
    param.data = param.data.to(dtype)


def _dtype(text: str) -> torch.dtype:
    value = getattr(torch, text.removeprefix("torch."))
    assert isinstance(value, torch.dtype)
    return value


def _retarget_input_casts(model: nn.Module, strategy: QuantBackend, log: _UndoLog) -> None:
    """Make every input-cast hook (this call's or an earlier prepare's) cast to its module's
    current dtype, so a later prepare with other options can never leave a stale cast (C03)."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, _InputCast):
                continue
            want = strategy.input_dtype(module)
            if want is None:
                own = [
                    q for q in module.parameters(recurse=False) if q.is_floating_point() and not is_wrapper_subclass(q)
                ]
                want = own[0].dtype if own else None
            if want is not None and want != hook.dtype:
                log.add(functools.partial(setattr, hook, "dtype", hook.dtype))
                hook.dtype = want


def _apply_input_casts(model: nn.Module, p: PreparationPlan, log: _UndoLog) -> None:
    modules = dict(model.named_modules())
    for mname, dtype in p.input_casts:
        module = modules.get(mname)
        if module is None or _has_input_cast(module):
            continue
        restore = mname in p.output_casts
        pre = _InputCast(_dtype(dtype), restore_output=restore)
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        log.add(handle.remove)
        if restore:
            out_handle = module.register_forward_hook(_OutputCast(pre), always_call=True)
            log.add(out_handle.remove)


def _apply_checkpointing(model: nn.Module, base: nn.Module, p: PreparationPlan, log: _UndoLog) -> None:
    opts: _Options = p._options
    if not p.gradient_checkpointing:
        # checkpointing turned on later (by a trainer or by hand) still gets the input-grad wiring
        _integrations.guard_checkpointing(base, dict(opts.checkpoint_kwargs), log.add)
        return
    kwargs = dict(opts.checkpoint_kwargs)
    kwargs["use_reentrant"] = bool(p.use_reentrant)
    was_on = ckpt.is_enabled(base)
    if not (was_on and ckpt.current_use_reentrant(base) == p.use_reentrant):
        before = list(getattr(base, "_require_grads_hooks", []) or [])
        before_ids = {id(h) for h in before}
        # undo puts back exactly what enable changes: the per-module checkpointing attributes
        # (also when checkpointing was already on with another use_reentrant) and transformers'
        # handle bookkeeping
        missing = object()
        saved_attrs = [
            (m, a, m.__dict__.get(a, missing))
            for m in base.modules()
            if hasattr(m, "gradient_checkpointing")
            for a in ("gradient_checkpointing", "_gradient_checkpointing_func")
        ]
        saved_handles = {a: vars(base).get(a, missing) for a in ("_require_grads_hooks", "_require_grads_hook")}
        hooked = {id(m._forward_hooks) for m in base.modules() if ckpt.has_input_grad_hook(m)}
        with _integrations.internal_enable():  # past our own guard on a second prepare
            ckpt.enable(base, kwargs)
        added = [h for h in (getattr(base, "_require_grads_hooks", []) or []) if id(h) not in before_ids]
        # transformers 5's activation_checkpointing_enable calls enable_input_require_grads itself;
        # keep only what the plan reports: no input-grad hook for non-reentrant checkpointing, and
        # never a second one on a module that already had one
        extra = [h for h in added if not p.use_reentrant or id(h.hooks_dict_ref()) in hooked]
        if extra:
            for h in extra:
                h.remove()
            added = [h for h in added if h not in extra]
            for attr, value in saved_handles.items():
                if value is not missing:
                    setattr(base, attr, value)
                elif attr in vars(base):
                    delattr(base, attr)
            if added:
                hf: Any = base
                hf._require_grads_hooks = before + added
                hf._require_grads_hook = (before + added)[0]

        def restore(added: list[Any] = added) -> None:
            for h in added:
                h.remove()
            for module, attr, value in saved_attrs:
                if value is not missing:
                    setattr(module, attr, value)
                elif attr in module.__dict__:
                    delattr(module, attr)
            for attr, value in saved_handles.items():
                if value is not missing:
                    setattr(base, attr, value)
                elif attr in vars(base):
                    delattr(base, attr)

        log.add(restore)
    if p.use_cache_off:
        config: Any = base.config
        if config.use_cache is True:
            config.use_cache = False
            log.add(lambda: setattr(config, "use_cache", True))
    if p.input_grad_hook:
        modules = dict(model.named_modules())
        for name in p.input_grad_modules:
            module = modules[name]
            if ckpt.has_input_grad_hook(module):
                continue
            handle = ckpt.add_input_grad_hook(module)
            log.add(handle.remove)
    # a Trainer / SFTTrainer enabling checkpointing or input grads again adds no second hook (issue 8)
    _integrations.guard_checkpointing(base, kwargs, log.add)


def _apply_use_cache_off(base: nn.Module, p: PreparationPlan, log: _UndoLog) -> None:
    # the distributed mode turns use_cache off even without checkpointing; a no-op when
    # _apply_checkpointing already did it
    config = getattr(base, "config", None)
    if p.use_cache_off and config is not None and config.use_cache is True:
        config.use_cache = False
        log.add(lambda: setattr(config, "use_cache", True))


def prepare(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "auto",
    upcast: Any = "auto",
    upcast_dtype: torch.dtype = torch.float32,
    keep_in_low_precision: Iterable[str] = (),
    distributed: _distributed.DistributedMode = None,
) -> PreparationReport:
    """Prepare ``model`` in place for k-bit adapter training and return what was done.

    Runs :func:`plan`, then: backend fix-ups (``before_training``), freeze every base
    parameter, cast what the plan casts, add input casts where dtypes end mixed, and turn on
    checkpointing with an explicit ``use_reentrant`` (adding the input-grad hook for reentrant
    checkpointing, once). Each plan warning is also emitted as a :class:`KbitPrepWarning`.
    Arguments are those of :func:`plan`.

    Returns:
        The report (the plan as applied) with :meth:`PreparationReport.undo`.

    Raises:
        Everything :func:`plan` raises, before anything is changed. Should an apply step fail
        unexpectedly, what was already done is undone before the error propagates.
    """
    p = plan(
        model,
        use_gradient_checkpointing,
        gradient_checkpointing_kwargs,
        backend=backend,
        upcast=upcast,
        upcast_dtype=upcast_dtype,
        keep_in_low_precision=keep_in_low_precision,
        distributed=distributed,
    )
    base = unwrap_model(model)
    strategy = get_backend(p.backend)
    log = _UndoLog(base)
    try:
        _apply_before_training(base, strategy, log)
        _apply_freeze(model, _inventory(model, strategy), log)
        _apply_casts(model, p, log)
        _apply_input_casts(model, p, log)
        _retarget_input_casts(model, strategy, log)
        _apply_checkpointing(model, base, p, log)
        _apply_use_cache_off(base, p, log)
    except BaseException:
        log.undo()
        raise
    for w in p.warnings:
        warnings.warn(w, KbitPrepWarning, stacklevel=2)
    if p.casts:
        logger.info("Upcast %d parameters (%+d bytes)", len(p.casts), p.bytes_delta)
    return PreparationReport.from_plan(p, log)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "auto",
    upcast: Any = "auto",
    upcast_dtype: torch.dtype = torch.float32,
    keep_in_low_precision: Iterable[str] = (),
    distributed: _distributed.DistributedMode = None,
) -> nn.Module:
    """Drop-in replacement for ``peft.prepare_model_for_kbit_training`` (peft 0.21).

    Same positional parameters; mutates ``model`` in place and returns the same object. The
    report is kept on the model as ``model._kbitprep_report`` so it can be undone. See
    :func:`prepare` for the keywords and errors.
    """
    report = prepare(
        model,
        use_gradient_checkpointing,
        gradient_checkpointing_kwargs,
        backend=backend,
        upcast=upcast,
        upcast_dtype=upcast_dtype,
        keep_in_low_precision=keep_in_low_precision,
        distributed=distributed,
    )
    model._kbitprep_report = report  # type: ignore[assignment]
    return model
