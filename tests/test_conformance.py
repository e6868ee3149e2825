"""The built-in strategies run the same conformance kit plugin authors run (kbitprep.testing)."""

from __future__ import annotations

import abc
import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from kbitprep import InvalidArgumentError, KbitPrepError, UnknownBackendError
from kbitprep.backends.base import QuantBackend
from kbitprep.testing import (
    BackendConformanceTests,
    DetectionTests,
    PlanApplyTests,
    StorageTests,
    TrainingTests,
    UndoTests,
)


def _backend(name: str) -> type[QuantBackend]:
    """The built-in class, imported directly: going through the registry here would read the
    plugin entry points at collection time, a side effect other tests must not see."""
    import importlib

    from kbitprep._registry import _BUILTINS

    module, _, attr = _BUILTINS[name].partition(":")
    cls: type[QuantBackend] = getattr(importlib.import_module(module), attr)
    return cls


# each built-in strategy's conformance classes live in tests/backends/test_<name>.py


# -- the kit has teeth: a backend that breaks the rules fails it --------------------------------


class _CutLinear(nn.Module):
    """int8 weight; its forward detaches the input, so nothing before it gets a gradient."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.in_features = self.out_features = n
        self.weight = nn.Parameter(torch.ones(n, n, dtype=torch.int8), requires_grad=False)
        self.register_buffer("mode", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() @ self.weight.to(x.dtype).T


class _CutModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.a = _CutLinear(8)
        self.b = _CutLinear(8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.embed(ids)))


class _RuleBreakingBackend(QuantBackend):
    name = "kbitprep-selftest-rulebreaker"
    priority = 50

    def detect(self, model: nn.Module) -> str | None:
        return "found _CutLinear" if any(isinstance(m, _CutLinear) for m in model.modules()) else None

    def before_training(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, _CutLinear):
                m.mode.fill_(1)  # a kernel-mode switch with no undo


class _RuleBreakingConformance(BackendConformanceTests):  # not collected: no Test prefix
    backend_cls = _RuleBreakingBackend

    def make_model(self) -> nn.Module:
        return _CutModel()


def test_the_kit_fails_a_backend_that_breaks_the_rules() -> None:
    from kbitprep import available_backends, register_backend

    if _RuleBreakingBackend.name not in available_backends():
        register_backend(_RuleBreakingBackend)
    kit = _RuleBreakingConformance()
    kit.test_detect_backend_picks_it()  # detection itself is fine
    with pytest.raises(AssertionError, match="pass no gradient to their input"):
        kit.test_adapters_train_after_prepare()
    with pytest.raises(AssertionError, match=r"undo\(\) did not restore: buffers\['a.mode'\]"):
        kit.test_undo_restores_bit_exactly()


def test_import_kbitprep_does_not_import_the_kit_or_pytest() -> None:
    code = "import sys, kbitprep; print(sorted(m for m in ('kbitprep.testing', 'pytest') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the kit's groups: one mixin each, and an opt-out that is reported, never silent -------------

GROUPS = {
    "detection": DetectionTests,
    "storage": StorageTests,
    "plan_apply": PlanApplyTests,
    "undo": UndoTests,
    "training": TrainingTests,
}


def test_every_check_belongs_to_exactly_the_group_of_its_mixin() -> None:
    assert all(issubclass(BackendConformanceTests, mixin) for mixin in GROUPS.values())
    seen: dict[str, str] = {}
    for group, mixin in GROUPS.items():
        names = [n for n in vars(mixin) if n.startswith("test_")]
        assert names, f"{mixin.__name__} has no checks"
        for name in names:
            assert getattr(mixin, name).conformance_group == group, f"{mixin.__name__}.{name}"
            seen[name] = group
    combined = {n for n in dir(BackendConformanceTests) if n.startswith("test_")}
    assert combined == set(seen), "a check of BackendConformanceTests is in no group, so no opt-out covers it"
    assert all(getattr(BackendConformanceTests, f"skip_{g}") is None for g in GROUPS)


class _OptsOutOfTraining(_RuleBreakingConformance):  # not collected: no Test prefix
    skip_training = "needs CUDA kernels"


def test_an_opted_out_check_raises_skip_with_the_reason_even_when_called_directly() -> None:
    kit = _OptsOutOfTraining()
    for check in (kit.test_adapters_train_after_prepare, kit.test_adapters_train_after_an_eval_forward):
        with pytest.raises(
            pytest.skip.Exception, match="opts out of the training conformance checks: needs CUDA kernels"
        ):
            check()


@pytest.mark.parametrize(
    ("attr", "value", "message"),
    [
        ("skip_trainig", "typo", r"no conformance group 'trainig'.*skip_detection, skip_storage, skip_plan_apply"),
        ("skip_training", True, r"skip_training is True; an opt-out must state why"),
        ("skip_undo", "  ", r"skip_undo is '  '; an opt-out must state why"),
        ("skip_storage", 1, r"skip_storage is 1; an opt-out must state why"),
    ],
)
def test_an_opt_out_without_a_reason_or_with_a_misspelt_group_is_refused(attr: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        type("TestBad", (BackendConformanceTests,), {attr: value, "backend_cls": _RuleBreakingBackend})


_OPT_OUT_SUITE = """
    from typing import ClassVar

    import torch
    from torch import nn

    from kbitprep import QuantBackend, register_backend
    from kbitprep.testing import BackendConformanceTests, DetectionTests


    class Int8Linear(nn.Module):
        def __init__(self, n_in: int, n_out: int, seed: int) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(seed)
            self.in_features, self.out_features = n_in, n_out
            weight = torch.randint(-127, 128, (n_out, n_in), generator=gen, dtype=torch.int8)
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.scale = nn.Parameter(torch.full((n_out,), 0.01), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ (self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]).T


    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.a = Int8Linear(16, 16, 1)
            self.b = Int8Linear(16, 50, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(self.embed(ids))))


    @register_backend
    class Int8Backend(QuantBackend):
        name: ClassVar[str] = "optout-int8"
        priority: ClassVar[int] = 10

        def detect(self, model: nn.Module) -> str | None:
            n = sum(isinstance(m, Int8Linear) for m in model.modules())
            return f"found {n} Int8Linear" if n else None


    class Kit:
        backend_cls = Int8Backend

        def make_model(self) -> nn.Module:
            torch.manual_seed(0)
            return TinyLM()


    class TestEveryGroup(Kit, BackendConformanceTests):
        pass


    class TestOptsOutOfTraining(Kit, BackendConformanceTests):
        skip_training = "needs CUDA kernels"


    class TestDetectionOnly(Kit, DetectionTests):
        pass
"""


def _junit_outcomes(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """``(class, test) -> (outcome, message)`` from a pytest JUnit XML report."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls = case.get("classname", "").rpartition(".")[2]
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                outcome, message = child.tag, child.get("message", "")
        out[(cls, case.get("name", ""))] = (outcome, message)
    return out


def test_a_backend_opting_out_of_a_group_gets_those_checks_reported_skipped_with_its_reason(tmp_path: Path) -> None:
    """A generated suite, run by pytest in a subprocess: the opted-out group is skipped with the
    stated reason, every other group runs and passes, and the same backend without the opt-out
    passes the training checks too (so the skip is the opt-out, not a failure hidden)."""
    (tmp_path / "test_optout.py").write_text(textwrap.dedent(_OPT_OUT_SUITE))
    report = tmp_path / "report.xml"
    env = {**os.environ, "KBITPREP_DISABLE_PLUGINS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rs",
        f"--junitxml={report}",
        "test_optout.py",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    outcomes = _junit_outcomes(report)
    training = {n for n in vars(TrainingTests) if n.startswith("test_")}
    per_class = {c: {n: o for (k, n), o in outcomes.items() if k == c} for c in {k for k, _ in outcomes}}
    assert len(per_class["TestEveryGroup"]) == len(per_class["TestOptsOutOfTraining"]) == 10
    assert all(o == ("passed", "") for o in per_class["TestEveryGroup"].values()), per_class["TestEveryGroup"]
    for name, (outcome, message) in per_class["TestOptsOutOfTraining"].items():
        if name in training:
            assert outcome == "skipped" and "needs CUDA kernels" in message, (name, outcome, message)
        else:
            assert outcome == "passed", (name, outcome, message)
    assert set(per_class["TestDetectionOnly"]) == {"test_backend_is_registered", "test_detect_backend_picks_it"}
    assert "needs CUDA kernels" in run.stdout  # -rs lists the reason in the summary
    assert "20 passed, 2 skipped" in run.stdout, run.stdout[-500:]


# -- the registry side of the contract: refused at registration or listed broken ----------------


class _NoDetect(QuantBackend):
    name: ClassVar[str] = "contract-nodetect"


class _Abstract(QuantBackend):
    name: ClassVar[str] = "contract-abstract"

    def detect(self, model: nn.Module) -> str | None:
        return None

    @abc.abstractmethod
    def kernel(self) -> str:
        """Never implemented."""


class _InitRaises(QuantBackend):
    name: ClassVar[str] = "contract-initraises"

    def __init__(self) -> None:
        raise RuntimeError("no CUDA device")

    def detect(self, model: nn.Module) -> str | None:
        return None


class _DetectNotCallable(QuantBackend):
    name: ClassVar[str] = "contract-detectnone"
    detect = None  # type: ignore[assignment]


class _DetectTakesNoModel(QuantBackend):
    name: ClassVar[str] = "contract-detectsig"

    def detect(self) -> str | None:  # type: ignore[override]
        return None


class _UpcastTakesOneArgument(QuantBackend):
    name: ClassVar[str] = "contract-upcastsig"

    def detect(self, model: nn.Module) -> str | None:
        return None

    def should_upcast(self, param: nn.Parameter) -> bool:  # type: ignore[override]
        return False


class _NotABackend:
    name = "contract-notabackend"

    def detect(self, model: nn.Module) -> str | None:
        return None


REFUSED: dict[str, tuple[type, str]] = {
    "no detect": (_NoDetect, r"_NoDetect does not implement detect\(\).*def detect\(self, model\) -> str \| None"),
    "abstract": (_Abstract, r"_Abstract cannot be instantiated: its abstract method\(s\) kernel are not implemented"),
    "__init__ raises": (
        _InitRaises,
        r"_InitRaises cannot be instantiated without arguments \(RuntimeError: no CUDA device\)",
    ),
    "detect not callable": (
        _DetectNotCallable,
        r"_DetectNotCallable.detect is None, not a method.*def detect\(self, model\)",
    ),
    "detect signature": (
        _DetectTakesNoModel,
        r"_DetectTakesNoModel.detect takes \(\), so kbitprep's call detect\(model\) would fail",
    ),
    "hook signature": (
        _UpcastTakesOneArgument,
        r"should_upcast takes \(param\).*`def should_upcast\(self, name, param, module\)`",
    ),
    "not a subclass": (_NotABackend, r"must be a subclass of kbitprep.QuantBackend"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_register_backend_refuses_a_class_the_registry_could_not_use(case: str, clean_registry: None) -> None:
    from kbitprep import available_backends, get_backend, register_backend

    cls, message = REFUSED[case]
    with pytest.raises(InvalidArgumentError, match=message) as info:
        register_backend(cls)
    assert isinstance(info.value, KbitPrepError)
    with pytest.raises(InvalidArgumentError, match=message):
        register_backend(replace=True)(cls)  # the decorator form, replacing nothing
    assert cls.name not in available_backends()
    with pytest.raises(UnknownBackendError):
        get_backend(cls.name)


def test_every_builtin_passes_the_registration_checks() -> None:
    """The checks a plugin faces refuse no built-in strategy (they are loaded without them)."""
    from kbitprep._registry import _BUILTINS, _check_class

    for name in _BUILTINS:
        _check_class(_backend(name))


CONTRACT_ENTRY_POINTS = {
    "nodetectquant": "NoDetectBackend does not implement detect()",
    "abstractquant": "AbstractBackend cannot be instantiated: its abstract method(s) kernel",
    "initraisesquant": "InitRaisesBackend cannot be instantiated without arguments (RuntimeError: initraisesquant needs a CUDA device",
    "detectnotcallablequant": "DetectNotCallableBackend.detect is None, not a method",
    "wrongsignaturequant": "WrongDetectSignatureBackend.detect takes (), so kbitprep's call detect(model) would fail",
}


def test_plugin_entry_points_naming_unusable_classes_are_listed_broken() -> None:
    """tests/plugins/brokenplugin declares one entry point per contract breach: each is listed as
    ``broken: <reason>`` with the distribution as source, none can be got, and detection runs."""
    from kbitprep import available_backends, detect_backend, get_backend

    try:
        declared = {ep.name for ep in importlib.metadata.distribution("kbitprep-brokenplugin").entry_points}
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kbitprep-brokenplugin is not installed: pip install --no-deps -e tests/plugins/brokenplugin")
    if not set(CONTRACT_ENTRY_POINTS) <= declared:
        pytest.skip("the installed kbitprep-brokenplugin predates its contract entry points: reinstall it")
    if os.environ.get("KBITPREP_DISABLE_PLUGINS") == "1":
        pytest.skip("KBITPREP_DISABLE_PLUGINS=1")
    infos = available_backends()
    for name, reason in CONTRACT_ENTRY_POINTS.items():
        info = infos[name]
        assert info.source == "kbitprep-brokenplugin"
        assert info.status.startswith("broken: InvalidArgumentError: ") and reason in info.status, info.status
        with pytest.raises(UnknownBackendError, match="broken plugin"):
            get_backend(name)
    assert detect_backend(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))).backend == "none"


class _FailsAfterRegistration(QuantBackend):
    """Instantiable when registered, then its ``__init__`` starts failing (a device went away)."""

    name: ClassVar[str] = "contract-flaky"
    priority: ClassVar[int] = 50
    fail = False

    def __init__(self) -> None:
        if type(self).fail:
            raise RuntimeError("the device went away")

    def detect(self, model: nn.Module) -> str | None:
        return "always"


def test_a_backend_that_cannot_be_created_during_detection_is_logged_and_listed_broken(
    clean_registry: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kbitprep import available_backends, detect_backend, register_backend

    register_backend(_FailsAfterRegistration)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    assert detect_backend(model).backend == "contract-flaky"
    monkeypatch.setattr(_FailsAfterRegistration, "fail", True)
    with caplog.at_level(logging.ERROR, logger="kbitprep._registry"):
        assert detect_backend(model).backend == "none"
    assert any("contract-flaky" in r.getMessage() and "device went away" in r.getMessage() for r in caplog.records)
    status = available_backends()["contract-flaky"].status
    assert status.startswith("broken: RuntimeError: the device went away"), status
    monkeypatch.setattr(_FailsAfterRegistration, "fail", False)
    assert detect_backend(model).backend == "contract-flaky"  # recovered: listed ok again
    assert available_backends()["contract-flaky"].status == "ok"
