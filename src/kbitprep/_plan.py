"""The records: :class:`PreparationPlan` (what will be done), :class:`PreparationReport` (what
was done, with ``undo``), and the undo log behind it."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from kbitprep._errors import PlanWarning

__all__ = [
    "CastItem",
    "ModelInput",
    "ModulePrecision",
    "PreparationPlan",
    "PreparationReport",
    "UndoLog",
    "set_text_renderer",
]

# how str(plan) draws a plan: kbitprep._render registers its renderer when the package is
# imported, so the records know nothing of how they are drawn
_TEXT_RENDERER: list[Callable[[PreparationPlan], str]] = []


def set_text_renderer(render: Callable[[PreparationPlan], str]) -> None:
    """Make ``render`` what ``str(plan)`` returns (:mod:`kbitprep._render` registers its own)."""
    _TEXT_RENDERER[:] = [render]


@dataclass(frozen=True, slots=True)
class CastItem:
    """One parameter the plan casts.

    Attributes:
        name: Parameter name (the first one when it is tied).
        shape: Its shape.
        from_dtype: Current dtype, e.g. ``torch.bfloat16``.
        to_dtype: Target dtype, e.g. ``torch.float32``.
        bytes_before: Storage bytes now (numel × element size).
        bytes_after: Storage bytes after the cast.
        tied: Other names of the same parameter (tied weights are cast once).
    """

    name: str
    shape: tuple[int, ...]
    from_dtype: torch.dtype
    to_dtype: torch.dtype
    bytes_before: int
    bytes_after: int
    tied: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModulePrecision:
    """How one module computes when the plan leaves the model in mixed dtypes.

    Attributes:
        name: Module name.
        stored: Dtype of its own floating (non-storage) parameters after the casts, or of the
            quantized layer's compute (quantized layers list their kernel's input dtype).
        computes: The dtype it computes in: its floating inputs are cast to it, and parameters
            stored narrower are brought up to it at use (never stored).
        upcast_at_use: Names of its own parameters brought up to ``computes`` at each use.
        output_to: Dtype its floating outputs are cast to (the activations' dtype), for a
            module that computes in another dtype and whose output flows on into a repeated
            block (inside one, or registered before the last one); ``None`` leaves the output in
            ``computes``: the final norm and ``lm_head`` give the model's outputs their dtype.
    """

    name: str
    stored: torch.dtype
    computes: torch.dtype
    upcast_at_use: tuple[str, ...] = ()
    output_to: torch.dtype | None = None


@dataclass(frozen=True, slots=True)
class ModelInput:
    """A floating input of the model and the dtype it must have after preparation.

    Attributes:
        name: The forward argument, e.g. ``"input_features"``, ``"pixel_values"``.
        module: The module that first takes it (e.g. ``"model.encoder.conv1"``), or ``""``.
        dtype: The dtype that module computes in.
        cast: Whether kbitprep casts the input itself (mixed plans); otherwise the caller must.
    """

    name: str
    module: str
    dtype: torch.dtype
    cast: bool


@dataclass(frozen=True, slots=True)
class PreparationPlan:
    """What :func:`kbitprep.prepare` will do (or, for a report, did), decided without changing anything.

    Dtypes are ``torch.dtype`` values; :meth:`to_dict` and ``str(plan)`` spell them as text.

    Attributes:
        backend: Registry name of the strategy used.
        reason: Why that backend was chosen (the evidence, or ``"backend='x' was passed"``).
        casts: The parameter casts, in model order.
        frozen: Base (non-adapter) parameters that end with ``requires_grad=False``.
        kept_trainable: Names of adapter parameters left trainable.
        gradient_checkpointing: Whether checkpointing is on after preparation.
        use_reentrant: The ``use_reentrant`` checkpointing uses; None when it is off.
        input_grad_hook: Whether the input embeddings' outputs are made to require grad: for
            reentrant checkpointing (kbitprep adds the hook), or because transformers' own
            enabling call installs it (kept, never removed).
        bytes_delta: Change in parameter storage, bytes (a tied parameter counts once): the
            casts plus ``fixup_bytes``.
        warnings: Findings to read before training, each a :class:`~kbitprep.PlanWarning`: a
            ``str`` with a ``kind`` (``"memory"``, ``"precision"``, ``"checkpointing"``, ...);
            ``prepare`` emits each as the :class:`~kbitprep.KbitPrepWarning` subclass of its kind.
        input_grad_modules: Modules whose output is made to require grad.
        compute_dtype: The model's one compute dtype: the quantized layers' (e.g.
            ``bnb_4bit_compute_dtype``), else the upcast dtype, else the model's dtype.
        activation_dtype: The dtype activations flow in between blocks after preparation.
        precision: Modules that compute in another dtype than they store, or than the
            activations around them; empty when nothing is mixed (peft's behaviour exactly).
        model_inputs: Floating model inputs and the dtype they must have.
        use_cache_off: Whether ``config.use_cache`` is turned off.
        distributed: The distributed engine (``"fsdp"``, ...), else ``None``.
        shard_dtype: In the distributed mode, the one dtype of every floating parameter.
        checkpoint_kwargs: The ``torch.utils.checkpoint`` keyword arguments used.
        activation_offload: Whether checkpointed activations are kept in host memory.
        checkpoint_every_n_layers: Every n-th layer is checkpointed.
        checkpoint_trainable_blocks_only: The blocks before the first block holding trainable
            parameters build no graph and are not checkpointed; every block from it on is
            (decided at each training forward). ``checkpoint_every_n_layers`` applies the same
            frozen-prefix rule.
        checkpointed_blocks: ``(checkpointed, total)`` blocks at a training forward of the
            model as it stands now (with a selective layout, none before the first block that
            holds an adapter).
        storage_bytes: Bytes of quantized storage.
        float_bytes: Bytes of plain floating base parameters before the casts.
        fixup_bytes: Bytes the backend's fix-ups (``before_training``) add to parameter
            storage, net (compressed-tensors' decompression: dense weights added, compressed
            tensors taken out of the model); part of ``bytes_delta``.
        freeze_names: Parameters ``prepare`` sets to ``requires_grad=False``.
        trainable_dtype: The dtype a parameter that becomes trainable after ``prepare`` is
            stored in at least, when it belongs to a module that computes wider than it stores
            (a kept module, a peft ``modules_to_save`` copy of one, a module adopted after
            ``prepare``) or to a ``modules_to_save`` copy: it is cast to it in place (the same
            ``Parameter`` object, so an optimizer built before still holds it) at the first forward
            after it appears, before any optimizer step can see it; each cast is listed in
            :attr:`PreparationReport.trainable_casts` and reverted by ``undo``. ``None`` when the
            options keep storage as it is (``upcast="none"``, a one-dtype distributed engine).
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
    warnings: tuple[PlanWarning, ...]
    input_grad_modules: tuple[str, ...] = ()
    compute_dtype: torch.dtype | None = None
    activation_dtype: torch.dtype | None = None
    precision: tuple[ModulePrecision, ...] = ()
    model_inputs: tuple[ModelInput, ...] = ()
    use_cache_off: bool = False
    distributed: str | None = None
    shard_dtype: torch.dtype | None = None
    checkpoint_kwargs: Mapping[str, Any] = field(default_factory=dict)
    activation_offload: bool = False
    checkpoint_every_n_layers: int = 1
    checkpoint_trainable_blocks_only: bool = False
    checkpointed_blocks: tuple[int, int] | None = None
    storage_bytes: int = 0
    float_bytes: int = 0
    fixup_bytes: int = 0
    freeze_names: tuple[str, ...] = field(default=(), repr=False)
    trainable_dtype: torch.dtype | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-serialisable data (dtypes as strings, callables as their repr)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        out["warning_kinds"] = [w.kind for w in self.warnings]
        return out

    def __str__(self) -> str:
        return _TEXT_RENDERER[0](self) if _TEXT_RENDERER else repr(self)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (CastItem, ModulePrecision, ModelInput)):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)  # "torch.float32"
    if isinstance(value, str):
        return str(value)  # a PlanWarning as plain text; its kind is in "warning_kinds"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return repr(value)


class UndoLog:
    """Every mutation ``prepare`` made, in order; ``undo`` reverts them last-first.

    The logs of one model form a stack: undoing a report first undoes every later report on the
    same model, so reports undone out of order still bring the model back to its state before
    the report being undone.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._entries: list[Callable[[], object]] = []
        self._stack: list[UndoLog] | None = None
        #: parameters cast after ``prepare`` returned (trainable copies of kept modules, cast at
        #: the first forward that sees them); reverted with the rest, kept here as the record
        self.trainable_casts: list[CastItem] = []
        if model is not None:
            self._stack = _LOG_STACKS.setdefault(model, [])
            self._stack.append(self)

    def add(self, fn: Callable[[], object]) -> None:
        """Record how to revert one change."""
        self._entries.append(fn)

    def __getstate__(self) -> dict[str, object]:
        """Pickled empty and marked: its entries close over the live model, so a report loaded
        back from a pickle (``torch.save(model)`` after ``prepare_model_for_kbit_training``)
        cannot undo, and :meth:`undo` says so."""
        casts = list(self.__dict__.get("trainable_casts", ()))  # plain records: they pickle
        return {"_entries": [], "_stack": None, "_unpickled": True, "trainable_casts": casts}

    def __deepcopy__(self, memo: dict[int, Any]) -> UndoLog:
        """A copy that cannot undo: its entries close over the original model's parameters and
        modules, which ``copy.deepcopy`` does not re-point at a copied model (TRL copies a prepared
        model as its reference model), so undoing through it would change the original. The
        record (``trainable_casts``) is copied; :meth:`undo` on the copy says so and changes
        nothing."""
        new = UndoLog.__new__(UndoLog)
        casts = copy.deepcopy(list(self.__dict__.get("trainable_casts", ())), memo)
        new.__dict__.update({"_entries": [], "_stack": None, "_copied": True, "trainable_casts": casts})
        return new

    def undo(self) -> None:
        """Revert this log (after every later log on the same model).

        Raises:
            InvalidModelError: The log was loaded back from a pickle or deep-copied; only the
                report ``prepare`` returned for the live model can undo it.
        """
        if self.__dict__.get("_unpickled") or self.__dict__.get("_copied"):
            from kbitprep._errors import InvalidModelError

            how = "loaded back from a pickle" if self.__dict__.get("_unpickled") else "copied (copy.deepcopy)"
            raise InvalidModelError(
                f"This report was {how}, which cannot carry how to undo the changes to the model it came from "
                "(its undo steps point at the original model's parameters and modules). Call undo() on the "
                "report prepare() returned for that model, or load the model as it was before prepare; nothing "
                "was changed."
            )
        stack = self._stack
        if stack is not None and self in stack:
            while stack and stack[-1] is not self:
                stack.pop()._revert()
            stack.pop()
        self._revert()

    def _revert(self) -> None:
        while self._entries:
            self._entries.pop()()


_LOG_STACKS: weakref.WeakKeyDictionary[nn.Module, list[UndoLog]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class PreparationReport(PreparationPlan):
    """The plan as applied by :func:`kbitprep.prepare`, plus :meth:`undo`."""

    _log: UndoLog = field(default_factory=UndoLog, repr=False, compare=False)

    @classmethod
    def from_plan(cls, p: PreparationPlan, log: UndoLog) -> PreparationReport:
        """The report of ``p`` applied, undone through ``log``."""
        values = {f.name: getattr(p, f.name) for f in fields(p)}
        return cls(**values, _log=log)

    @property
    def trainable_casts(self) -> tuple[CastItem, ...]:
        """Parameters cast to :attr:`trainable_dtype` after ``prepare`` returned, because they
        became trainable in a module kept low or in a peft ``modules_to_save`` copy (e.g. the
        ``lm_head`` copy of ``modules_to_save=["lm_head"]``), in the order they were cast; ``undo``
        casts them back."""
        return tuple(self._log.__dict__.get("trainable_casts", ()))

    def undo(self) -> None:
        """Revert everything :func:`kbitprep.prepare` changed: dtypes (bit-exact),
        ``requires_grad``, the hooks and compute-dtype casts it added, checkpointing and
        ``config.use_cache``, and backend fix-ups. Calling it again does nothing."""
        self._log.undo()
