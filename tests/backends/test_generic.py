"""generic strategy (a quantization method no strategy claims): the conformance kit on the tiny
Llama flagged ``quant_method="sparsegpt"``, with an int8 ``qweight`` buffer standing in for that
method's storage (a label with no storage behind it reads as dequantized, i.e. ``none``).

Plus what is particular to it: parameters are frozen and checkpointing wired, nothing is cast
under ``upcast="auto"`` (an unknown kernel may own its compute dtype), and a ``"backend"`` plan
warning names the method, whichever evidence tier carries it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kbitprep
from _models import checkpointing_on, load, saved_tiny
from kbitprep.backends.generic import GenericBackend
from kbitprep.testing import BackendConformanceTests

STORAGE = "model.layers.0.mlp.down_proj.qweight"


def _flagged(root: str, tier: str = "config_dict") -> nn.Module:
    """The bf16 tiny Llama, an int8 buffer as storage, and the method named in one tier."""
    model = load(saved_tiny(root))
    model.model.layers[0].mlp.down_proj.register_buffer("qweight", torch.zeros(8, dtype=torch.int8))
    if tier == "config_dict":
        model.config.quantization_config = {"quant_method": "sparsegpt", "bits": 2}
    elif tier == "quantization_method":
        model.quantization_method = "sparsegpt"
    elif tier == "is_quantized":
        model.is_quantized = True  # no method name at all
    else:
        raise AssertionError(tier)
    return model


class TestUnknownMethodConformance(BackendConformanceTests):
    backend_cls = GenericBackend

    @pytest.fixture(autouse=True)
    def _model_root(self, model_root: str) -> None:
        self.root = model_root

    def make_model(self) -> nn.Module:
        return _flagged(self.root)


# -- what is particular to the generic fallback -----------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "method"),
    [("config_dict", "sparsegpt"), ("quantization_method", "sparsegpt"), ("is_quantized", "unknown")],
)
def test_nothing_is_cast_and_one_backend_warning_names_the_method(model_root: str, tier: str, method: str) -> None:
    """Whichever tier flags the model, generic claims it; auto plans no cast and exactly one
    ``"backend"`` PlanWarning naming the method, which prepare emits as BackendWarning. After
    prepare every parameter keeps its bf16 dtype and is frozen, checkpointing is on, and the
    storage buffer is untouched."""
    model = _flagged(model_root, tier)
    storage = dict(model.named_buffers())[STORAGE].clone()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}

    p = kbitprep.plan(model)
    assert p.backend == "generic"
    assert (p.casts, p.bytes_delta) == ((), 0)
    assert len(p.warnings) == 1
    (warning,) = p.warnings
    assert isinstance(warning, kbitprep.PlanWarning) and warning.kind == "backend"
    assert f"{method!r}" in warning

    with pytest.warns(kbitprep.BackendWarning, match=f"{method!r}"):
        report = kbitprep.prepare(model)
    assert (report.casts, report.bytes_delta) == ((), 0)
    assert {n: q.dtype for n, q in model.named_parameters()} == dtypes
    assert not any(q.requires_grad for q in model.parameters())
    assert report.gradient_checkpointing is True and checkpointing_on(model)
    assert torch.equal(dict(model.named_buffers())[STORAGE], storage)


def test_label_without_storage_is_not_generic(model_root: str) -> None:
    """The same label on a model with no storage behind it is an unquantized (dequantized)
    model: the ``none`` strategy, whose reason names the label."""
    model = load(saved_tiny(model_root))
    model.config.quantization_config = {"quant_method": "sparsegpt", "bits": 2}
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "none"
    assert "'sparsegpt'" in detection.reason
