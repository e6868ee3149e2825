"""Structured warnings (issue 17): every plan warning has a kind, ``prepare`` emits it as the
``KbitPrepWarning`` subclass of that kind, so users filter by kind and tests assert kinds."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora
from _models import load, saved_tiny, tiny_llama, transformers_major
from _quantized import bnb4_config
from kbitprep._errors import WARNING_KINDS

# transformers 4.57: the meta-device check of the first module cannot decide for an unquantized
# Llama, so the structural rule also warns that inputs_embeds must now be fp32 (a precision note)
INPUT_NOTE = ["precision"] if transformers_major() < 5 else []


def _plan_kinds(p: kbitprep.PreparationPlan) -> list[str]:
    assert all(isinstance(w, kbitprep.PlanWarning) for w in p.warnings), p.warnings
    assert all(w.kind in WARNING_KINDS for w in p.warnings)
    return [w.kind for w in p.warnings]


def test_every_kind_has_its_own_public_category() -> None:
    categories = list(WARNING_KINDS.values())
    assert len(set(categories)) == len(categories)
    for kind, category in WARNING_KINDS.items():
        assert issubclass(category, kbitprep.KbitPrepWarning) and category is not kbitprep.KbitPrepWarning
        assert getattr(kbitprep, category.__name__) is category, kind
    with pytest.raises(ValueError, match="unknown warning kind"):
        kbitprep.PlanWarning("speed", "text")


def test_unquantized_model_warns_memory_and_checkpointing() -> None:
    """An unquantized bf16 model: the upcast's bytes (memory) and checkpointing left off as peft
    leaves it (checkpointing)."""
    p = kbitprep.plan(tiny_llama(torch.bfloat16))
    kinds = _plan_kinds(p)
    assert sorted(kinds) == sorted(["checkpointing", "memory", *INPUT_NOTE])
    memory = next(w for w in p.warnings if w.kind == "memory")
    assert f"{p.bytes_delta:,} bytes" in memory and memory.category is kbitprep.MemoryWarning
    assert p.to_dict()["warning_kinds"] == kinds
    assert all(type(w) is str for w in p.to_dict()["warnings"])
    assert "warning (memory): " in str(p)


def test_prepare_emits_each_kind_as_its_category_and_filters_by_kind() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = kbitprep.prepare(tiny_llama(torch.bfloat16))
    emitted = sorted(w.category.__name__ for w in caught if issubclass(w.category, kbitprep.KbitPrepWarning))
    assert emitted == sorted(["CheckpointingWarning", "MemoryWarning", *(["PrecisionWarning"] if INPUT_NOTE else [])])
    assert sorted(str(w.message) for w in caught) == sorted(str(w) for w in report.warnings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=kbitprep.MemoryWarning)
        kbitprep.prepare(tiny_llama(torch.bfloat16))
    left = sorted(w.category.__name__ for w in caught if issubclass(w.category, kbitprep.KbitPrepWarning))
    assert left == sorted(["CheckpointingWarning", *(["PrecisionWarning"] if INPUT_NOTE else [])])


def test_keep_pattern_that_keeps_nothing_is_a_precision_warning(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model = load(saved_tiny(str(tmp_path)), quantization_config=bnb4_config())
    # q_proj holds only packed 4-bit storage, which is never cast: the pattern keeps nothing
    p = kbitprep.plan(model, keep_in_low_precision=("q_proj",))
    precision = [w for w in p.warnings if w.kind == "precision"]
    assert len(precision) == 1 and "'q_proj'" in precision[0]
    assert precision[0].category is kbitprep.PrecisionWarning


def test_adapters_before_prepare_and_backend_override_kinds(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model = add_lora(load(saved_tiny(str(tmp_path)), quantization_config=bnb4_config()))
    kinds = _plan_kinds(kbitprep.plan(model))
    assert "adapters" in kinds
    overridden = kbitprep.plan(tiny_llama(torch.bfloat16), backend="bitsandbytes")
    assert "detection" in _plan_kinds(overridden)


def test_plugin_plain_string_warnings_are_backend_kind(clean_registry: None) -> None:
    class Loud(kbitprep.QuantBackend):
        name = "loud-test-backend"

        def detect(self, model: nn.Module) -> str | None:
            return None

        def plan_warnings(self, model: nn.Module) -> list[str]:
            return ["the loud kernel is slow on CPU"]

    kbitprep.register_backend(Loud, replace=True)
    p = kbitprep.plan(tiny_llama(torch.bfloat16), backend="loud-test-backend")
    backend = [w for w in p.warnings if w.kind == "backend"]
    assert backend == ["the loud kernel is slow on CPU"]
    assert backend[0].category is kbitprep.BackendWarning


def test_plan_warning_survives_copy_and_pickle() -> None:
    w = kbitprep.PlanWarning("memory", "adds 10 bytes")
    for clone in (copy.copy(w), copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert clone == "adds 10 bytes" and clone.kind == "memory" and isinstance(clone, kbitprep.PlanWarning)
    assert repr(w) == "PlanWarning('memory', 'adds 10 bytes')"
