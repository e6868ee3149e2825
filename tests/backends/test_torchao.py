"""torchao strategy: the conformance kit on the tiny Llama loaded with
``TorchAoConfig(Int8WeightOnlyConfig())`` (14 ``Int8Tensor`` weights; embeddings, norms and
lm_head stay bf16).

Plus what is particular to torchao, checked against torchao's own classes: nothing is upcast
under ``upcast="auto"``, and the ``Int8Tensor`` weights (which report bf16 but hold int8
``qdata``) keep their class and their bytes even when the rest of the model is upcast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'kbitprep[torchao]')")

from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_  # noqa: E402

import kbitprep  # noqa: E402
from _models import load, saved_tiny, tiny_llama, transformers_major  # noqa: E402
from _plan_warnings import warnings_of  # noqa: E402
from kbitprep.backends.torchao import TorchAoBackend  # noqa: E402
from kbitprep.testing import BackendConformanceTests  # noqa: E402

N_LINEARS = 14  # 7 per decoder layer, 2 layers; TorchAoConfig leaves lm_head plain
N_PLAIN = 7  # embed_tokens, 5 RMSNorm weights, lm_head


def _torchao_int8(root: str) -> nn.Module:
    from transformers import TorchAoConfig

    return load(saved_tiny(root), quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


def _int8_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, Int8Tensor)}


def _inner(t: torch.Tensor) -> dict[str, tuple[torch.dtype, tuple[int, ...], torch.Tensor]]:
    """The plain tensors inside a torchao subclass (qdata, scale, ...), detached copies."""
    names, _ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return {n: (getattr(t, n).dtype, tuple(getattr(t, n).shape), getattr(t, n).detach().clone()) for n in names}


class TestTorchAoInt8WeightOnlyConformance(BackendConformanceTests):
    backend_cls = TorchAoBackend

    @pytest.fixture(autouse=True)
    def _model_root(self, model_root: str) -> None:
        self.root = model_root

    def make_model(self) -> nn.Module:
        return _torchao_int8(self.root)


class TestTorchAoDirectQuantize(BackendConformanceTests):
    """torchao.quantize_ with no transformers attributes: found by the tensor subclasses (C07)."""

    backend_cls = TorchAoBackend

    def make_model(self) -> nn.Module:
        model = tiny_llama(torch.bfloat16)
        quantize_(model, Int8WeightOnlyConfig())
        return model


# -- what is particular to torchao -----------------------------------------------------------------


def test_auto_upcasts_nothing_and_int8_weights_keep_their_type(model_root: str) -> None:
    """``upcast="auto"``: no cast, bytes_delta 0, no plan warning (Int8WeightOnly is trainable);
    after prepare every parameter keeps its dtype (bf16 throughout), the 14 weights are still
    ``Int8Tensor`` with int8 qdata bit-identical to before, and everything is frozen."""
    model = _torchao_int8(model_root)
    weights = _int8_weights(model)
    assert len(weights) == N_LINEARS
    inner = {n: _inner(w) for n, w in weights.items()}
    assert all(parts["qdata"][0] == torch.int8 for parts in inner.values())
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}

    p = kbitprep.plan(model, upcast="auto")
    assert p.backend == "torchao"
    assert (p.casts, p.bytes_delta) == ((), 0)
    # transformers 4.57's TorchAoHfQuantizer.is_trainable compares quant_type with strings, so it
    # reads every AOBaseConfig as untrainable: the one true warning there is that Trainer refuses it
    expected = [] if transformers_major() >= 5 else ["backend"]
    assert [w.kind for w in p.warnings] == expected
    assert warnings_of(p, "backend", "transformers marks this torchao config non-trainable") == list(p.warnings)

    kbitprep.prepare(model, upcast="auto")
    assert {n: q.dtype for n, q in model.named_parameters()} == dtypes
    after = _int8_weights(model)
    assert set(after) == set(weights)
    for name, w in after.items():
        assert type(w) is Int8Tensor, f"{name}: {type(w).__name__}"
        for part, (dtype, shape, data) in inner[name].items():
            now = getattr(w, part)
            assert (now.dtype, tuple(now.shape)) == (dtype, shape), f"{name}.{part}"
            assert torch.equal(now, data), f"{name}.{part} changed"
    assert not any(q.requires_grad for q in model.parameters())


def test_upcast_all_casts_only_the_plain_parameters(model_root: str) -> None:
    """``upcast="all"`` casts the 7 plain bf16 parameters to fp32 (2 bytes per element more),
    never an ``Int8Tensor`` (its reported bf16 dtype is not what it stores); a KbitPrepWarning
    says so."""
    model = _torchao_int8(model_root)
    weights = set(_int8_weights(model))
    plain = {n: q.numel() for n, q in model.named_parameters() if n not in weights}
    assert len(plain) == N_PLAIN
    p = kbitprep.plan(model, upcast="all")
    assert {c.name for c in p.casts} == set(plain)
    assert p.bytes_delta == 2 * sum(plain.values())
    assert p.warnings
    with pytest.warns(kbitprep.KbitPrepWarning):
        kbitprep.prepare(model, upcast="all")
    for name, q in model.named_parameters():
        if name in weights:
            assert type(q) is Int8Tensor and q.dtype == torch.bfloat16, name
        else:
            assert q.dtype == torch.float32, name
