"""EETQ strategy: transformers 5's own ``EetqLinear`` on CPU with a pure-torch kernel stand-in.

The real kernel (hub ``kernels-community/quantization-eetq``) needs CUDA; on CPU the layers are
built by class with int8 weights and fp16 scales, and run through :class:`FakeEetqKernels`. peft
dispatches LoRA to ``EetqLoraLinear`` only when an ``eetq`` package is importable, so a stub
package is put on ``sys.path`` for the LoRA tests and removed afterwards.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _lora import add_lora, grad_counts, lora_step_trains, standard_step
from _measure import kernel_inputs, storage_state
from _models import N_LINEARS, N_PLAIN, standard_batch, transformers_major
from _quantized import UPCAST_IDS, UPCASTS, FakeEetqKernels, eetq_tiny, prepare_quietly
from kbitprep import detect_backend, get_backend, plan, prepare
from kbitprep.backends.eetq import EetqBackend
from kbitprep.testing import BackendConformanceTests

pytestmark = pytest.mark.skipif(
    transformers_major() < 5,
    reason="transformers 4.57 has no EetqLinear of its own (it takes the layer from the eetq package, which has no CPU build); the stub-kernel tests build transformers 5's EetqLinear",
)


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' EetqLinear calls the module global ``eetq_kernels_hub`` (set only by
    ``replace_with_eetq_linear`` after a hub download); point it at the pure-torch stand-in."""
    monkeypatch.setattr("transformers.integrations.eetq.eetq_kernels_hub", FakeEetqKernels, raising=False)


def _reload_peft_eetq() -> None:
    from peft import import_utils

    import_utils.is_eetq_available.cache_clear()
    importlib.reload(importlib.import_module("peft.tuners.lora.eetq"))


@pytest.fixture
def eetq_stub(tmp_path: Path) -> Iterator[None]:
    """A 3-line ``eetq`` package on sys.path so peft 0.21's ``dispatch_eetq`` (which checks
    ``find_spec("eetq")`` and then also accepts transformers' EetqLinear) wraps EetqLinear."""
    pkg = tmp_path / "stub" / "eetq"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import torch\n\n\nclass EetqLinear(torch.nn.Module):\n    pass\n")
    had = sys.modules.pop("eetq", None)
    sys.path.insert(0, str(pkg.parent))
    try:
        _reload_peft_eetq()
        yield
    finally:
        sys.path.remove(str(pkg.parent))
        sys.modules.pop("eetq", None)
        if had is not None:
            sys.modules["eetq"] = had
        _reload_peft_eetq()


def _layers(model: nn.Module) -> list[nn.Module]:
    from transformers.integrations.eetq import EetqLinear

    return [m for m in model.modules() if isinstance(m, EetqLinear)]


# -- the conformance kit (kbitprep.testing) --------------------------------------------------------


@pytest.mark.usefixtures("fake_kernel")
class TestEetqStubKernel(BackendConformanceTests):
    """transformers' EetqLinear with a pure-torch stand-in for the hub kernel (no CPU build exists)."""

    backend_cls = EetqBackend

    def make_model(self) -> nn.Module:
        return eetq_tiny(torch.float16)

    def make_adapters(self, model: nn.Module) -> list[nn.Parameter]:
        from transformers.integrations.eetq import EetqLinear

        from kbitprep.testing import attach_lora

        params: list[nn.Parameter] = []
        for i, m in enumerate(m for m in model.modules() if isinstance(m, EetqLinear)):
            n_in, n_out = m.weight.shape  # EetqLinear stores its int8 weight as (in, out)
            params.extend(attach_lora(m, seed=i, in_features=n_in, out_features=n_out).parameters())
        return params


# -- what is particular to EETQ --------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["all", "attribute", "config", None], ids=["quantizer", "attribute", "config", "modules"]
)
def test_eetq_is_detected_in_every_tier_and_never_upcast(flag: str | None) -> None:
    """EETQ found by quantizer, quantization_method, config object or EetqLinear class; auto casts nothing."""
    model = eetq_tiny(flag=flag)
    detection = detect_backend(model)
    assert detection.backend == "eetq"
    expected = {
        "all": "model.hf_quantizer is EetqHfQuantizer (quant_method 'eetq')",
        "attribute": "model.quantization_method is 'eetq'",
        "config": "model.config.quantization_config.quant_method is 'eetq'",
        None: "found 14 EetqLinear modules",
    }[flag]
    assert detection.reason == expected
    p = plan(model)
    assert (p.casts, p.bytes_delta, p.precision) == ((), 0, ())


@pytest.mark.parametrize("upcast", UPCASTS, ids=UPCAST_IDS)
def test_eetq_int8_weights_and_scales_are_storage(upcast: Any) -> None:
    """int8 weight (in, out) and fp16 weight_scales (out,), loaded with requires_grad True, are
    storage: never cast, bytes identical, frozen by prepare; only the 7 plain params may be cast."""
    model = eetq_tiny()
    backend = get_backend("eetq")
    before = storage_state(model, backend)
    assert len(before) == 2 * N_LINEARS
    q = "model.layers.0.self_attn.q_proj"
    assert before[f"{q}.weight"][:4] == (torch.int8, (64, 64), 4096, False)
    assert before[f"{q}.weight_scales"][:4] == (torch.float16, (64,), 128, True)
    report = prepare_quietly(model, upcast)
    after = storage_state(model, backend)
    assert {n: (s[0], s[1], s[2], s[4]) for n, s in after.items()} == {
        n: (s[0], s[1], s[2], s[4]) for n, s in before.items()
    }
    assert not any(s[3] for s in after.values())
    assert len(report.casts) == (0 if upcast == "auto" else N_PLAIN)
    assert not any("weight_scales" in c.name or c.name.endswith("proj.weight") for c in report.casts)


def test_eetq_lora_trains_one_step(fake_kernel: None, eetq_stub: None, capsys: pytest.CaptureFixture[str]) -> None:
    """prepare with defaults, LoRA wrapped as EetqLoraLinear, standard step: 8 with grad, 4 non-zero,
    fp16 logits, int8 storage bit-identical afterwards."""
    model = eetq_tiny()
    backend = get_backend("eetq")
    before = storage_state(model, backend)
    report = prepare(model)
    assert report.backend == "eetq" and report.casts == ()
    peft_model = add_lora(model)
    assert sum(type(m).__name__ == "EetqLoraLinear" for m in peft_model.modules()) == 4
    peft_model.train()
    assert peft_model(input_ids=standard_batch()).logits.dtype == torch.float16
    loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    assert storage_state(model, backend) == {n: (*s[:3], False, s[4]) for n, s in before.items()}
    with capsys.disabled():
        print(f"\n[eetq stub kernel] loss={loss:.4f} grad_counts={grad_counts(grads)}")


def test_eetq_layers_get_fp16_inputs_under_upcast_all(fake_kernel: None, eetq_stub: None) -> None:
    """upcast="all" warns and casts the 7 plain parameters; every EetqLinear still gets fp16."""
    model = eetq_tiny()
    report = prepare_quietly(model, "all")
    assert len(report.casts) == N_PLAIN
    peft_model = add_lora(model)
    with kernel_inputs(_layers(model)) as seen:
        _loss, grads = standard_step(peft_model)
    assert grad_counts(grads) == (8, 8, 4)
    assert len(seen) >= N_LINEARS and set(seen) == {torch.float16}


@pytest.mark.gpu
def test_eetq_real_kernel_on_cuda_trains_one_step(model_root: str, eetq_stub: None) -> None:
    """transformers' EETQ path for real: quantize the fp16 tiny model on CUDA with EetqConfig
    (hub kernel kernels-community/quantization-eetq), prepare, LoRA, one step."""
    kernels = pytest.importorskip("kernels", reason="kernels is not installed (pip install kernels)")
    from transformers import AutoModelForCausalLM, EetqConfig

    try:  # what replace_with_eetq_linear fetches; needs the hub or a local cache of it
        kernels.get_kernel("kernels-community/quantization-eetq", version=1)
    except Exception as exc:
        pytest.skip(f"the EETQ hub kernel kernels-community/quantization-eetq is not available here: {exc}")

    from _models import saved_tiny

    model = AutoModelForCausalLM.from_pretrained(
        saved_tiny(model_root, "float16"), dtype=torch.float16, device_map="cuda", quantization_config=EetqConfig()
    )
    assert len(_layers(model)) == N_LINEARS
    backend = get_backend("eetq")
    before = storage_state(model, backend)
    report = prepare(model)
    assert report.backend == "eetq" and report.casts == ()
    lora_step_trains(model)
    after = storage_state(model, backend)
    assert {n: s[4] for n, s in after.items()} == {n: s[4] for n, s in before.items()}
