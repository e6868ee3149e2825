"""The error tree of kbitprep.

Every error is a :class:`KbitPrepError` and also the builtin exception that callers already
catch for that kind of fault (``LookupError``, ``ImportError``, ``ValueError``, ``TypeError``).
Messages are full sentences: what was found, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "WARNING_KINDS",
    "AdapterWarning",
    "BackendUnavailableError",
    "BackendWarning",
    "CheckpointingWarning",
    "DetectionWarning",
    "DistributedWarning",
    "DuplicateBackendError",
    "InvalidArgumentError",
    "InvalidModelError",
    "KbitPrepError",
    "KbitPrepWarning",
    "MemoryWarning",
    "NotShardableError",
    "NotTrainableError",
    "PlanWarning",
    "PrecisionWarning",
    "UnknownBackendError",
]


class KbitPrepError(Exception):
    """Base class of every error kbitprep raises."""


class UnknownBackendError(KbitPrepError, LookupError):
    """No backend is registered under the requested name; the message lists the known names."""


class BackendUnavailableError(KbitPrepError, ImportError):
    """A backend's library is not installed.

    Attributes:
        install_hint: The pip command that installs what is missing, e.g.
            ``"pip install bitsandbytes"``.
    """

    def __init__(self, message: str, *, install_hint: str = "") -> None:
        super().__init__(message)
        self.install_hint = install_hint


class NotTrainableError(KbitPrepError, ValueError):
    """Adapters on this model cannot receive gradients; raised before anything is changed."""


class NotShardableError(KbitPrepError, ValueError):
    """``distributed="fsdp"`` was asked for, but FSDP cannot shard this backend's quantized storage."""


class DuplicateBackendError(KbitPrepError, ValueError):
    """A backend name is already registered and ``replace=True`` was not given."""


class InvalidArgumentError(KbitPrepError, ValueError, TypeError):
    """An argument has the wrong type or value (also a ``ValueError`` and a ``TypeError``)."""


class InvalidModelError(KbitPrepError, ValueError, TypeError):
    """The model cannot be prepared as it is: not an ``nn.Module``, or weights on the meta device."""


class KbitPrepWarning(UserWarning):
    """Base category of every warning kbitprep emits; each warning has a subclass by kind, so
    ``warnings.filterwarnings("ignore", category=kbitprep.MemoryWarning)`` silences one kind."""


class DetectionWarning(KbitPrepWarning):
    """Kind ``"detection"``: which backend was chosen is uncertain (another backend also claims
    the model, or ``backend=`` overrides what was detected)."""


class BackendWarning(KbitPrepWarning):
    """Kind ``"backend"``: what the backend strategy found in the model's layers (kernels, modes,
    library versions), as its ``plan_warnings`` states it."""


class MemoryWarning(KbitPrepWarning):
    """Kind ``"memory"``: bytes the plan adds or the model holds beyond what its quantization
    suggests (upcast of an unquantized model, weight matrices left unquantized)."""


class PrecisionWarning(KbitPrepWarning):
    """Kind ``"precision"``: casts and compute dtypes (a ``keep_in_low_precision`` pattern that keeps
    nothing, an input in another dtype than the module that receives it)."""


class AdapterWarning(KbitPrepWarning):
    """Kind ``"adapters"``: adapters attached before ``prepare``, or trainable copies of kept modules."""


class CheckpointingWarning(KbitPrepWarning):
    """Kind ``"checkpointing"``: gradient checkpointing options that cannot work as asked."""


class DistributedWarning(KbitPrepWarning):
    """Kind ``"distributed"``: a sharded run (FSDP, DeepSpeed ZeRO-3) and what it changes."""


WARNING_KINDS: dict[str, type[KbitPrepWarning]] = {
    "detection": DetectionWarning,
    "backend": BackendWarning,
    "memory": MemoryWarning,
    "precision": PrecisionWarning,
    "adapters": AdapterWarning,
    "checkpointing": CheckpointingWarning,
    "distributed": DistributedWarning,
}
"""Every warning kind and its category."""


class PlanWarning(str):
    """One entry of ``PreparationPlan.warnings``: the message (this ``str``, so code that reads
    warnings as text keeps working) and its :attr:`kind`.

    Attributes:
        kind: One of :data:`WARNING_KINDS`' keys (``"memory"``, ``"precision"``, ...).
    """

    kind: str

    def __new__(cls, kind: str, message: str) -> PlanWarning:
        if kind not in WARNING_KINDS:
            raise ValueError(f"unknown warning kind {kind!r}; one of {sorted(WARNING_KINDS)}")
        obj = super().__new__(cls, message)
        obj.kind = kind
        return obj

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]
        return (self.kind, str.__str__(self))

    @property
    def message(self) -> str:
        """The text, as a plain ``str``."""
        return str.__str__(self)

    @property
    def category(self) -> type[KbitPrepWarning]:
        """The :class:`KbitPrepWarning` subclass ``prepare`` emits this warning as."""
        return WARNING_KINDS[self.kind]

    def __repr__(self) -> str:
        return f"PlanWarning({self.kind!r}, {str.__str__(self)!r})"


def as_plan_warning(message: str, kind: str) -> PlanWarning:
    """``message`` with its kind: a :class:`PlanWarning` keeps its own, a plain ``str`` (what a
    plugin's ``plan_warnings`` returns) gets ``kind``."""
    return message if isinstance(message, PlanWarning) else PlanWarning(kind, message)
