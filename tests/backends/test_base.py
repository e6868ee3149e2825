"""The helpers ``QuantBackend`` gives every strategy, checked through the strategies that use them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import kbitprep
from _models import tiny_llama
from _plan_warnings import has_warning

# each strategy whose plan warns when its label has no layers behind it, with the layer it names
FLAGGED = {
    "aqlm": "AQLM QuantizedLinear",
    "awq": "AWQ layer",
    "gptq": "GPTQ layer",
    "hqq": "HQQLinear",
    "quanto": "quanto layer",
}
LIBRARY = {"aqlm": "aqlm", "awq": "gptqmodel", "gptq": "gptqmodel", "hqq": "hqq", "quanto": "optimum.quanto"}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("method", list(FLAGGED))
def test_a_label_without_layers_is_a_backend_warning_when_the_strategy_is_forced(method: str) -> None:
    """A model labelled with a quantization method whose layers were not loaded (plain linears)
    is detected as unquantized; forcing that method's strategy (``backend=``) plans with one
    ``backend`` warning naming the evidence and the missing layer (``flagged_without_layers``),
    and an unlabelled plain model gets none."""
    if not _installed(LIBRARY[method]):
        pytest.skip(f"{LIBRARY[method]} is not installed")
    model = tiny_llama().to(torch.float16)
    assert not has_warning(kbitprep.plan(model, backend=method), "backend", "flagged")
    model.config.quantization_config = {"quant_method": method}
    assert kbitprep.detect_backend(model).backend == "none"
    p = kbitprep.plan(model, backend=method)
    flagged = [w for w in p.warnings if "flagged" in w]
    assert len(flagged) == 1, p.warnings
    assert flagged[0].kind == "backend"
    assert f"quantization_config['quant_method'] is {method!r}" in flagged[0]
    assert FLAGGED[method] in flagged[0]
