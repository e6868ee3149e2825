"""The error tree of kbitprep.

Every error is a :class:`KbitPrepError` and also the builtin exception that callers already
catch for that kind of fault (``LookupError``, ``ImportError``, ``ValueError``, ``TypeError``).
Messages are full sentences: what was found, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "DuplicateBackendError",
    "InvalidArgumentError",
    "InvalidModelError",
    "KbitPrepError",
    "KbitPrepWarning",
    "NotShardableError",
    "NotTrainableError",
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
    """Category of every warning kbitprep emits (plan warnings, as applied by ``prepare``)."""
