from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    # tests/test_properties.py builds and prepares a model per example: no deadline. "kbitprep"
    # (the default) keeps that file within ~2 minutes on 2 cores and is derandomized, so CI is
    # reproducible; "fuzz" (`nox -s fuzz`, --hypothesis-profile=fuzz) explores many more examples.
    _slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("kbitprep", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_slow)
    settings.register_profile("fuzz", max_examples=500, deadline=None, suppress_health_check=_slow, print_blob=True)
    settings.load_profile("kbitprep")  # --hypothesis-profile, when given, loads its profile after this


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A session-wide folder where the tiny models are saved once."""
    return str(tmp_path_factory.mktemp("models"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); run `nox -s tests_gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Runtime registrations and detection-time failures made by a test are dropped afterwards
    (plugins stay loaded)."""
    from kbitprep import _registry as reg

    reg._registry.load_plugins()
    state = (reg._registry.classes, reg._registry.sources, reg._registry.instances, reg._registry.failed)
    saved = [dict(d) for d in state]
    yield
    for target, value in zip(state, saved, strict=True):
        target.clear()
        target.update(value)  # type: ignore[attr-defined]
