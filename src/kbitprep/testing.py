"""Conformance tests a backend's own test suite runs against its :class:`~kbitprep.QuantBackend`.

Pytest base classes in the style of fsspec's abstract tests: subclass one in a ``test_*.py`` file,
name the subclass ``Test...``, say which backend class it checks and how to build a small model
quantized by it. Every check then runs against that backend::

    from kbitprep.testing import BackendConformanceTests

    class TestToyQuant(BackendConformanceTests):
        backend_cls = ToyQuantBackend

        def make_model(self) -> nn.Module:
            return tiny_model_quantized_by_toyquant()

The checks come in groups, one mixin each; :class:`BackendConformanceTests` combines them all:

- :class:`DetectionTests` (``skip_detection``): the backend is registered (entry point or
  :func:`kbitprep.register_backend`) and :func:`kbitprep.detect_backend` picks it for the model,
  through its own ``detect`` or the default one, which reads the backend's ``quant_methods`` and
  the layers its :meth:`~kbitprep.QuantBackend.find_layers` yields;
- :class:`StorageTests` (``skip_storage``): quantized storage (parameters the backend calls
  storage, and integer buffers) is never cast, never made trainable and keeps its bytes, under
  ``upcast="auto"``, ``"all"`` and a callable that says yes to everything;
- :class:`PlanApplyTests` (``skip_plan_apply``): :func:`kbitprep.plan` changes nothing,
  :func:`kbitprep.prepare` does exactly what the plan says (casts, ``bytes_delta`` equal to the
  measured change in parameter bytes, warnings) and freezes every base parameter; a second
  prepare casts nothing and changes nothing;
- :class:`UndoTests` (``skip_undo``): :meth:`kbitprep.PreparationReport.undo` restores every
  parameter and buffer bit-exactly, ``requires_grad``, hooks, checkpointing flags and
  ``config.use_cache``;
- :class:`TrainingTests` (``skip_training``): after prepare, adapters (by default a small
  LoRA-style adapter the kit attaches to every quantized layer) get finite, nonzero gradients,
  also when an eval-mode no-grad forward ran before prepare (the kernel-mode traps of
  bitsandbytes and gptqmodel on CPU), unless the backend refuses that model with
  :class:`~kbitprep.NotTrainableError`.

A backend that cannot run a group here (a GPU-only kernel, a forward-only method) keeps the
combined class and states why it opts out; that group's checks are then reported as skipped
with the reason, never passed::

    class TestMyGpuQuant(BackendConformanceTests):
        backend_cls = MyGpuQuantBackend
        skip_training = "the backward kernel needs CUDA"

The model may be a plain ``nn.Module``: nothing here needs transformers or peft. The kit calls
``model(input_ids)`` and reads ``.logits`` when the output has it; override
:meth:`ConformanceBase.loss` for another calling convention.

This module imports pytest; ``import kbitprep`` never imports it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

try:
    import pytest
except ImportError as exc:  # pragma: no cover - only reached outside a test run
    raise ImportError(
        "kbitprep.testing is a pytest conformance kit; install pytest (`pip install pytest`) "
        "to run it. `import kbitprep` does not need it."
    ) from exc

from kbitprep._errors import InvalidArgumentError, KbitPrepWarning, NotTrainableError
from kbitprep._plan import PreparationPlan
from kbitprep._prepare import plan, prepare
from kbitprep._registry import available_backends, detect_backend, get_backend
from kbitprep._storage import model_param_bytes
from kbitprep.backends.base import QuantBackend

__all__ = [
    "BackendConformanceTests",
    "ConformanceBase",
    "DetectionTests",
    "LoRAAdapter",
    "PlanApplyTests",
    "StorageTests",
    "TrainingTests",
    "UndoTests",
    "attach_lora",
]


# -- a hand-written LoRA-style adapter -----------------------------------------------------------


class LoRAAdapter(nn.Module):
    """A low-rank adapter ``x @ A.T @ B.T * scale`` added to a layer's output by a forward hook.

    Unlike LoRA's usual initialisation, ``B`` starts small and nonzero, so both ``A`` and ``B``
    get a nonzero gradient at the first step and a zero gradient means gradient flow is broken.

    Args:
        in_features: Width of the layer's input.
        out_features: Width of the layer's output.
        r: Rank. Default 4.
        dtype: Dtype of ``A`` and ``B``. Default ``torch.float32``, as peft keeps LoRA weights.
        device: Device of ``A`` and ``B``.
        seed: Seed of the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 4,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(
            (torch.randn(r, in_features, generator=gen) / math.sqrt(in_features)).to(device, dtype)
        )
        self.lora_B = nn.Parameter((torch.randn(out_features, r, generator=gen) * 0.01).to(device, dtype))
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T) * self.scale


def attach_lora(
    module: nn.Module,
    r: int = 4,
    seed: int = 0,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
) -> LoRAAdapter:
    """Attach a :class:`LoRAAdapter` to ``module`` with a forward hook; returns the adapter.

    The adapter is not registered as a submodule, so the model's own parameters are unchanged.
    ``module`` must have ``in_features`` and ``out_features`` (every quantized linear layer of
    bitsandbytes, torchao, hqq, gptqmodel and aqlm has them) and take the activations as its
    first positional argument; pass ``in_features`` / ``out_features`` for a layer without them.

    Raises:
        TypeError: The sizes are neither given nor attributes of ``module``.
    """
    in_f = in_features if in_features is not None else getattr(module, "in_features", None)
    out_f = out_features if out_features is not None else getattr(module, "out_features", None)
    if not isinstance(in_f, int) or not isinstance(out_f, int):
        raise TypeError(
            f"{type(module).__name__} has no integer in_features/out_features, so the kit cannot size "
            "an adapter for it. Pass in_features/out_features, or override make_adapters(model) in your "
            "conformance test class."
        )
    device = next((t.device for t in module.parameters(recurse=False)), None)
    if device is None:
        device = next((t.device for t in module.buffers(recurse=False)), torch.device("cpu"))
    adapter = LoRAAdapter(in_f, out_f, r, device=device, seed=seed)

    def hook(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        delta: torch.Tensor = adapter(args[0])
        return output + delta.to(output.dtype)

    module.register_forward_hook(hook)
    return adapter


# -- snapshots -----------------------------------------------------------------------------------


def _digest(t: torch.Tensor) -> str:
    """sha256 of the real storage of ``t`` (inner tensors of a wrapper subclass), with dtype and shape."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ctx = flatten()
        inner = "|".join(_digest(getattr(t, n)) for n in names)
        return f"{type(t).__name__}[{inner}]"
    data = t.detach()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    raw = data.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if data.numel() else b""
    return f"{hashlib.sha256(raw).hexdigest()}:{t.dtype}:{tuple(t.shape)}:{type(t).__name__}"


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int, int]]:
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_backward_pre_hooks", {})),
        )
        for name, m in model.named_modules()
    }


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything prepare may change, in comparable form."""
    config = getattr(model, "config", None)
    return {
        "params": {n: (_digest(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: _digest(b) for n, b in model.named_buffers(remove_duplicate=False)},
        "hooks": _hook_counts(model),
        "checkpointing": {
            n: getattr(m, "gradient_checkpointing", None)
            for n, m in model.named_modules()
            if getattr(m, "gradient_checkpointing", None) is not None
        },
        "use_cache": getattr(config, "use_cache", None),
    }


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in before:
        b, a = before[key], after[key]
        if isinstance(b, dict):
            for name in sorted(set(b) | set(a)):
                if b.get(name) != a.get(name):
                    out.append(f"{key}[{name!r}]: {b.get(name)!r} -> {a.get(name)!r}")
        elif b != a:
            out.append(f"{key}: {b!r} -> {a!r}")
    return out


def _always(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return True


# -- opting out of a group -----------------------------------------------------------------------

#: The conformance groups, each checked by one mixin, in the order they run.
_GROUPS: tuple[str, ...] = ("detection", "storage", "plan_apply", "undo", "training")

_Test = TypeVar("_Test", bound=Callable[..., None])


def _validated_reason(owner: str, attr: str, value: object) -> str | None:
    """The opt-out reason of ``owner.attr``, or None to keep the group.

    Raises:
        InvalidArgumentError: ``attr`` names no group, or ``value`` is neither None nor a
            non-empty string.
    """
    group = attr.removeprefix("skip_")
    if group not in _GROUPS:
        known = ", ".join(f"skip_{g}" for g in _GROUPS)
        raise InvalidArgumentError(
            f"{owner}.{attr}: there is no conformance group {group!r}. The opt-out attributes are "
            f'{known}; set one of them to the reason, e.g. skip_training = "needs CUDA kernels".'
        )
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(
            f"{owner}.{attr} is {value!r}; an opt-out must state why, as a non-empty string "
            f'(e.g. {attr} = "needs CUDA kernels"). Leave it None to run the {group} checks.'
        )
    return value


def _group(name: str) -> Callable[[_Test], _Test]:
    """Mark a check as belonging to conformance group ``name``.

    The check then skips, with the stated reason, when the test class sets ``skip_<name>``.
    """

    def decorate(test: _Test) -> _Test:
        @functools.wraps(test)
        def run(self: ConformanceBase, *args: Any, **kwargs: Any) -> None:
            self._skip_if_opted_out(name)
            test(self, *args, **kwargs)

        run.conformance_group = name  # type: ignore[attr-defined]
        return cast(_Test, run)

    return decorate


# -- the kit -------------------------------------------------------------------------------------


class ConformanceBase:
    """What every conformance mixin shares: the backend under test, its model, and the opt-outs.

    Subclass a mixin (or :class:`BackendConformanceTests`, which combines them all) as
    ``Test<Name>``, set :attr:`backend_cls` and implement :meth:`make_model`.

    A backend that cannot pass a group on the machine running the tests (a GPU-only kernel, a
    forward-only method) opts out of that group by setting its ``skip_<group>`` attribute to the
    reason. The group's checks are then reported as skipped with that reason; they never pass
    silently. Any other ``skip_*`` attribute, or a reason that is not a non-empty string, is an
    error when the class is defined.

    Attributes:
        backend_cls: The :class:`~kbitprep.QuantBackend` subclass under test. It must be
            registered (through the ``kbitprep.backends`` entry point of the installed
            distribution, or :func:`kbitprep.register_backend`) so that detection can pick it.
        input_ids: Optional ``LongTensor`` of shape ``(batch, seq)`` fed to the model; by default
            random ids of shape ``(2, 16)`` below the first ``nn.Embedding``'s vocabulary size.
        expects_storage: Whether the model holds quantized storage. True for every quantized
            backend; the ``none`` backend sets it False.
        seed: Seed of the default inputs and adapters.
        skip_detection: Reason to skip :class:`DetectionTests`, or None (the default) to run them.
        skip_storage: Reason to skip :class:`StorageTests`, or None.
        skip_plan_apply: Reason to skip :class:`PlanApplyTests`, or None.
        skip_undo: Reason to skip :class:`UndoTests`, or None.
        skip_training: Reason to skip :class:`TrainingTests`, or None.
    """

    backend_cls: ClassVar[type[QuantBackend]]
    input_ids: ClassVar[torch.Tensor | None] = None
    expects_storage: ClassVar[bool] = True
    seed: ClassVar[int] = 0
    skip_detection: ClassVar[str | None] = None
    skip_storage: ClassVar[str | None] = None
    skip_plan_apply: ClassVar[str | None] = None
    skip_undo: ClassVar[str | None] = None
    skip_training: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in vars(cls).items():
            if attr.startswith("skip_") and not callable(value):
                _validated_reason(cls.__qualname__, attr, value)

    def _skip_if_opted_out(self, group: str) -> None:
        """Skip the running test when this class opts out of ``group``, with the stated reason.

        Args:
            group: One of ``"detection"``, ``"storage"``, ``"plan_apply"``, ``"undo"``,
                ``"training"``.

        Raises:
            InvalidArgumentError: ``group`` is not a conformance group, or its opt-out is not
                a non-empty string.
        """
        attr = f"skip_{group}"
        reason = _validated_reason(type(self).__qualname__, attr, getattr(self, attr, None))
        if reason is not None:
            pytest.skip(f"{type(self).__name__} opts out of the {group} conformance checks: {reason}")

    # -- what the author supplies ------------------------------------------------------------

    def make_model(self) -> nn.Module:
        """A small model quantized by the backend under test; a fresh one on every call.

        Raises:
            NotImplementedError: The test class does not implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_model()")

    def make_adapters(self, model: nn.Module) -> list[nn.Parameter]:
        """Attach trainable adapters to the prepared ``model``; return their parameters.

        Default: one :class:`LoRAAdapter` on every module that directly holds quantized storage
        (or, when there is none, on every ``nn.Linear``). Every returned parameter must get a
        nonzero gradient from one backward pass.
        """
        targets = [m for _n, m in self._storage_modules(model)]
        if not targets:
            targets = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not targets:
            raise AssertionError(
                "The model has no quantized layer and no nn.Linear to attach the default adapter to; "
                "override make_adapters(model)."
            )
        params: list[nn.Parameter] = []
        for i, module in enumerate(targets):
            params.extend(attach_lora(module, seed=self.seed + i).parameters())
        return params

    def make_input_ids(self, model: nn.Module) -> torch.Tensor:
        """The batch fed to the model: :attr:`input_ids` when set, else random token ids."""
        if self.input_ids is not None:
            return self.input_ids
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if emb is None:
            raise AssertionError("The model has no nn.Embedding; set input_ids on the test class.")
        device = emb.weight.device
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, emb.num_embeddings, (2, 16), generator=gen).to(device)

    def loss(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """A scalar loss from one forward.

        Next-token cross entropy on the logits when they have a vocabulary axis, else the mean
        square of the output. Override for another calling convention.
        """
        out = model(input_ids)
        logits = getattr(out, "logits", out)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        assert isinstance(logits, torch.Tensor), f"model output {type(out).__name__} has no tensor logits"
        if (
            logits.dim() == 3
            and logits.shape[:2] == input_ids.shape
            and logits.shape[1] > 1
            and logits.shape[-1] > int(input_ids.max())
        ):
            return nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
            )
        return logits.float().pow(2).mean()

    # -- helpers ------------------------------------------------------------------------------

    @property
    def backend(self) -> QuantBackend:
        """A fresh instance of :attr:`backend_cls`."""
        return self.backend_cls()

    def _storage(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Quantized storage: parameters the backend calls storage, and non-floating buffers."""
        backend = self.backend
        modules = dict(model.named_modules())
        for name, p in model.named_parameters():
            owner = modules.get(name.rpartition(".")[0], model)
            if backend.is_quantized_param(name, p, owner):
                yield name, p
        for name, b in model.named_buffers():
            if not b.is_floating_point() and not b.is_complex():
                yield name, b

    def _storage_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        backend = self.backend
        out = []
        for mname, module in model.named_modules():
            own = [
                backend.is_quantized_param(f"{mname}.{n}" if mname else n, p, module)
                for n, p in module.named_parameters(recurse=False)
            ]
            own += [not b.is_floating_point() for b in module.buffers(recurse=False)]
            if any(own):
                out.append((mname, module))
        return out

    def _prepare(self, model: nn.Module, **options: Any) -> tuple[Any, list[str]]:
        """prepare() with its KbitPrepWarnings recorded instead of raised."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KbitPrepWarning)
            report = prepare(model, **options)
        others = [w for w in caught if not issubclass(w.category, KbitPrepWarning)]
        for w in others:  # give every other warning back to the test's own filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return report, [str(w.message) for w in caught if issubclass(w.category, KbitPrepWarning)]


class DetectionTests(ConformanceBase):
    """Detection: the backend is registered, and :func:`kbitprep.detect_backend` picks it.

    A backend that keeps the default :meth:`~kbitprep.QuantBackend.detect` is checked the same
    way: the model's quantizer, config or legacy attributes must name one of its
    ``quant_methods``, or :meth:`~kbitprep.QuantBackend.find_layers` must find its layers. (The
    registry already refuses a backend with neither and no ``detect`` of its own.) Opt out with
    ``skip_detection = "<reason>"``.
    """

    @_group("detection")
    def test_backend_is_registered(self) -> None:
        """The entry point (or :func:`kbitprep.register_backend`) made the backend available."""
        name = self.backend_cls.name
        info = available_backends().get(name)
        assert info is not None, (
            f"backend {name!r} is not registered: install the distribution that declares it in the "
            "'kbitprep.backends' entry-point group, or call kbitprep.register_backend()"
        )
        assert info.status == "ok", f"backend {name!r} status is {info.status!r}"
        assert isinstance(get_backend(name), self.backend_cls)

    @_group("detection")
    def test_detect_backend_picks_it(self) -> None:
        """``detect()`` claims the model and :func:`kbitprep.detect_backend` chooses this backend."""
        model = self.make_model()
        reason = self.backend.detect(model)
        hint = ""
        if self.backend_cls.detect is QuantBackend.detect:
            hint = (
                " (the default detect: no quantizer, config or legacy attribute names one of its "
                f"quant_methods {sorted(self.backend_cls.quant_methods)}, and find_layers found no layer)"
            )
        assert reason, f"{self.backend_cls.__name__}.detect() did not claim the model{hint}"
        detection = detect_backend(model)
        assert detection.backend == self.backend_cls.name, (
            f"detect_backend chose {detection.backend!r} ({detection.reason}), not {self.backend_cls.name!r}"
        )
        assert detection.reason


class StorageTests(ConformanceBase):
    """Storage: quantized storage is never cast, never made trainable and keeps its bytes.

    Checked under ``upcast="auto"``, ``"all"`` and a callable that says yes to everything.
    Opt out with ``skip_storage = "<reason>"``.
    """

    @pytest.mark.parametrize("upcast", ["auto", "all", _always], ids=["auto", "all", "callable"])
    @_group("storage")
    def test_storage_is_never_cast_nor_trainable(self, upcast: Any) -> None:
        """Storage keeps its class, dtype and bytes and stays frozen under ``upcast``."""
        model = self.make_model()
        before = {n: (_digest(t), type(t)) for n, t in self._storage(model)}
        if self.expects_storage:
            assert before, (
                "make_model() returned a model with no quantized storage: no parameter for which "
                f"{self.backend_cls.__name__}.is_quantized_param is True and no integer buffer"
            )
        p = plan(model, upcast=upcast)
        cast_names = {n for c in p.casts for n in (c.name, *c.tied)}
        assert not cast_names & set(before), f"the plan casts storage: {sorted(cast_names & set(before))}"
        self._prepare(model, upcast=upcast)
        after = dict(self._storage(model))
        assert set(after) == set(before), "storage tensors appeared or disappeared during prepare"
        for name, (digest, cls) in before.items():
            t = after[name]
            assert type(t) is cls, f"{name}: class changed from {cls.__name__} to {type(t).__name__}"
            assert _digest(t) == digest, f"{name}: quantized storage bytes or dtype changed"
            assert not t.requires_grad, f"{name}: quantized storage was made trainable"


class PlanApplyTests(ConformanceBase):
    """Plan and apply: ``plan()`` changes nothing, ``prepare()`` does exactly what it planned.

    Also idempotence: a second ``prepare()`` casts nothing and changes nothing. Opt out with
    ``skip_plan_apply = "<reason>"``.
    """

    @_group("plan_apply")
    def test_plan_changes_nothing_and_prepare_applies_it(self) -> None:
        """The report equals the plan; casts, ``bytes_delta``, warnings and freezing as planned."""
        model = self.make_model()
        state = _state(model)
        dtypes = {n: q.dtype for n, q in model.named_parameters(remove_duplicate=False)}
        p = plan(model)
        assert isinstance(p, PreparationPlan)
        assert p.backend == self.backend_cls.name
        changed = _diff(state, _state(model))
        assert not changed, "plan() changed the model: " + "; ".join(changed[:5])

        bytes_before = model_param_bytes(model)
        report, emitted = self._prepare(model)
        assert report.to_dict() == p.to_dict(), "the report differs from the plan made just before"
        assert tuple(emitted) == p.warnings, f"warnings emitted {emitted} differ from plan.warnings {p.warnings}"
        assert model_param_bytes(model) - bytes_before == p.bytes_delta, (
            f"bytes_delta {p.bytes_delta:+,} differs from the measured change {model_param_bytes(model) - bytes_before:+,}"
        )
        self._assert_casts_as_planned(model, p, dtypes)
        trainable = [n for n, q in model.named_parameters() if q.requires_grad and n not in p.kept_trainable]
        assert not trainable, f"base parameters left trainable: {trainable[:5]}"

    @staticmethod
    def _assert_casts_as_planned(model: nn.Module, p: PreparationPlan, dtypes: dict[str, torch.dtype]) -> None:
        """Every planned cast happened (ties kept) and no other parameter changed dtype."""
        params = dict(model.named_parameters(remove_duplicate=False))
        casted = {}
        for c in p.casts:
            for name in (c.name, *c.tied):
                casted[name] = c.to_dtype
                assert params[name].dtype == c.to_dtype, f"{name} is {params[name].dtype}, plan said {c.to_dtype}"
                assert c.tied == () or params[name] is params[c.name], f"{name} is no longer tied to {c.name}"
        for name, param in params.items():
            if name not in casted:
                assert param.dtype == dtypes[name], f"{name} changed dtype without a planned cast"

    @_group("plan_apply")
    def test_second_prepare_changes_nothing(self) -> None:
        """A second ``prepare()`` casts nothing and changes nothing."""
        model = self.make_model()
        self._prepare(model)
        state = _state(model)
        second, _ = self._prepare(model)
        assert second.casts == (), f"second prepare casts again: {[c.name for c in second.casts]}"
        assert second.bytes_delta == 0
        changed = _diff(state, _state(model))
        assert not changed, "the second prepare changed the model: " + "; ".join(changed[:5])


class UndoTests(ConformanceBase):
    """Undo: :meth:`kbitprep.PreparationReport.undo` restores the model bit-exactly.

    Every parameter and buffer, ``requires_grad``, hooks, checkpointing flags and
    ``config.use_cache``; a second ``undo()`` does nothing. Opt out with ``skip_undo = "<reason>"``.
    """

    @_group("undo")
    def test_undo_restores_bit_exactly(self) -> None:
        """After ``undo()`` the model is as it was before ``prepare()`` (twice)."""
        model = self.make_model()
        state = _state(model)
        report, _ = self._prepare(model)
        report.undo()
        changed = _diff(state, _state(model))
        assert not changed, "undo() did not restore: " + "; ".join(changed[:5])
        report.undo()  # a second undo does nothing
        assert not _diff(state, _state(model))


class TrainingTests(ConformanceBase):
    """Training: after ``prepare()``, adapters get finite, nonzero gradients.

    Also when an eval-mode no-grad forward ran before ``prepare()`` (the kernel-mode traps of
    bitsandbytes and gptqmodel on CPU), unless the backend refuses that model with
    :class:`~kbitprep.NotTrainableError`. Each quantized layer must also pass a gradient to its
    own input. Opt out with ``skip_training = "<reason>"`` (a forward-only method, a kernel that
    needs a GPU).
    """

    @_group("training")
    def test_adapters_train_after_prepare(self) -> None:
        """Adapters on every quantized layer get finite, nonzero gradients after ``prepare()``."""
        model = self.make_model()
        self._prepare(model)
        self._assert_adapters_train(model)

    @_group("training")
    def test_adapters_train_after_an_eval_forward(self) -> None:
        """An eval-mode no-grad forward before prepare (a smoke test, an evaluation at step 0)
        must not silently cut gradients: the backend restores the layers or refuses the model."""
        model = self.make_model()
        model.eval()
        with torch.no_grad():
            model(self.make_input_ids(model))
        try:
            self._prepare(model)
        except NotTrainableError:
            return  # refused loudly: conforming
        self._assert_adapters_train(model)

    def _assert_adapters_train(self, model: nn.Module) -> None:
        """One training step: every adapter gets a gradient, and every layer passes one back."""
        layers = self._storage_modules(model)
        inputs: dict[str, torch.Tensor] = {}

        def recorder(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
                if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                    inputs.setdefault(name, args[0].detach())

            return hook

        handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers]
        adapters = self.make_adapters(model)
        assert adapters, "make_adapters returned no parameters"
        model.train()
        try:
            loss = self.loss(model, self.make_input_ids(model))
        finally:
            for h in handles:
                h.remove()
        assert torch.isfinite(loss).item(), f"loss is not finite: {loss.item()}"
        torch.autograd.backward(loss)
        missing = [i for i, p in enumerate(adapters) if p.grad is None]
        zero = [i for i, p in enumerate(adapters) if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
        assert not missing and not zero, (
            f"{len(missing)} of {len(adapters)} adapter parameters got no gradient and {len(zero)} a zero "
            f"gradient after prepare (first: #{(missing or zero)[0]}); gradient flow is broken"
        )
        for name, t in self._storage(model):
            assert t.grad is None, f"quantized storage {name!r} received a gradient"
        self._assert_layers_pass_gradient(layers, inputs)

    @staticmethod
    def _assert_layers_pass_gradient(layers: list[tuple[str, nn.Module]], inputs: dict[str, torch.Tensor]) -> None:
        """Each quantized layer, on the input it saw, passes a nonzero gradient to that input.

        Adapters on every layer can carry gradient around a layer whose backward is broken, so
        each layer is also checked on its own, in train mode, without its hooks (the adapter's
        own path must not count): an adapter before it needs that gradient.
        """
        blocked = []
        for name, module in layers:
            if name not in inputs:
                continue
            x = inputs[name].clone().requires_grad_(True)
            with torch.enable_grad():
                y = module.forward(x)
            if not isinstance(y, torch.Tensor):
                continue
            if y.grad_fn is None:
                blocked.append(name)
                continue
            (grad,) = torch.autograd.grad(y.float().sum(), x, allow_unused=True)
            if grad is None or not bool(grad.abs().sum() > 0):
                blocked.append(name)
        assert not blocked, (
            f"{len(blocked)} quantized layer(s) pass no gradient to their input in train mode after "
            f"prepare (first: {blocked[0]!r}); adapters before them would not train"
        )


class BackendConformanceTests(DetectionTests, StorageTests, PlanApplyTests, UndoTests, TrainingTests):
    """Every conformance group at once: subclass as ``Test<Name>`` to check one backend.

    Combines :class:`DetectionTests`, :class:`StorageTests`, :class:`PlanApplyTests`,
    :class:`UndoTests` and :class:`TrainingTests`; the attributes and hooks are those of
    :class:`ConformanceBase`. To leave a group out on purpose, set its ``skip_<group>``
    attribute to the reason (its checks are then reported as skipped with it), or subclass
    only the mixins that apply.
    """
