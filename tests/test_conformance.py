"""The built-in strategies run the same conformance kit plugin authors run (kbitprep.testing)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _models import bnb4_config, load, tiny_llama, transformers_major
from kbitprep.backends.base import QuantBackend
from kbitprep.testing import BackendConformanceTests


def _needs(*libs: str) -> pytest.MarkDecorator:
    missing = [lib for lib in libs if importlib.util.find_spec(lib) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


@functools.cache
def _saved(dtype_name: str = "bfloat16") -> str:
    root = tempfile.mkdtemp(prefix="kbitprep-conformance-")
    atexit.register(shutil.rmtree, root, True)
    tiny_llama(getattr(torch, dtype_name)).save_pretrained(root)
    return root


def _backend(name: str) -> type[QuantBackend]:
    """The built-in class, imported directly: going through the registry here would read the
    plugin entry points at collection time, a side effect other tests must not see."""
    import importlib

    from kbitprep._registry import _BUILTINS

    module, _, attr = _BUILTINS[name].partition(":")
    cls: type[QuantBackend] = getattr(importlib.import_module(module), attr)
    return cls


@_needs("bitsandbytes")
class TestBitsAndBytes4bit(BackendConformanceTests):
    backend_cls = _backend("bitsandbytes")

    def make_model(self) -> nn.Module:
        return load(_saved(), quantization_config=bnb4_config())


@_needs("bitsandbytes")
class TestBitsAndBytes8bit(BackendConformanceTests):
    backend_cls = _backend("bitsandbytes")

    def make_model(self) -> nn.Module:
        from transformers import BitsAndBytesConfig

        return load(_saved(), quantization_config=BitsAndBytesConfig(load_in_8bit=True))


@_needs("torchao")
class TestTorchAoInt8WeightOnly(BackendConformanceTests):
    backend_cls = _backend("torchao")

    def make_model(self) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return load(_saved(), quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


@_needs("torchao")
class TestTorchAoDirectQuantize(BackendConformanceTests):
    """torchao.quantize_ with no transformers attributes: found by the tensor subclasses (C07)."""

    backend_cls = _backend("torchao")

    def make_model(self) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = tiny_llama(torch.bfloat16)
        quantize_(model, Int8WeightOnlyConfig())
        return model


class TestNoQuantization(BackendConformanceTests):
    backend_cls = _backend("none")
    expects_storage = False

    def make_model(self) -> nn.Module:
        return tiny_llama(torch.bfloat16)


# -- the strategies another developer is writing: run the kit on them once they exist ---------


def _maybe(name: str) -> Any:
    from kbitprep._registry import _BUILTINS

    path = _BUILTINS[name].partition(":")[0]
    if importlib.util.find_spec(path) is None:
        return None
    return _backend(name)


def _fixtures() -> Any:
    sys.path.insert(0, str(Path(__file__).parent / "backends"))
    import _fixtures

    return _fixtures


@pytest.mark.skipif(_maybe("hqq") is None, reason="kbitprep.backends.hqq is not written yet")
@_needs("hqq")
class TestHqqDirect(BackendConformanceTests):
    """HQQLinear swapped in by hand, no transformers attribute: found by module type (C15)."""

    backend_cls = _maybe("hqq") or QuantBackend

    def make_model(self) -> nn.Module:
        return _fixtures().hqq_tiny()  # type: ignore[no-any-return]


@pytest.mark.skipif(_maybe("eetq") is None, reason="kbitprep.backends.eetq is not written yet")
@_needs("transformers")
@pytest.mark.skipif(
    transformers_major() < 5,
    reason="transformers 4.57 has no EetqLinear of its own (it takes the layer from the eetq package, which has no CPU build); the stub-kernel tests build transformers 5's EetqLinear",
)
class TestEetqStubKernel(BackendConformanceTests):
    """transformers' EetqLinear with a pure-torch stand-in for the hub kernel (no CPU build exists)."""

    backend_cls = _maybe("eetq") or QuantBackend

    @pytest.fixture(autouse=True)
    def _fake_kernel(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import transformers.integrations.eetq as eetq

        monkeypatch.setattr(eetq, "eetq_kernels_hub", _fixtures().FakeEetqKernels, raising=False)

    def make_model(self) -> nn.Module:
        return _fixtures().eetq_tiny(torch.float16)  # type: ignore[no-any-return]

    def make_adapters(self, model: nn.Module) -> list[nn.Parameter]:
        from transformers.integrations.eetq import EetqLinear

        from kbitprep.testing import attach_lora

        params: list[nn.Parameter] = []
        for i, m in enumerate(m for m in model.modules() if isinstance(m, EetqLinear)):
            n_in, n_out = m.weight.shape  # EetqLinear stores its int8 weight as (in, out)
            params.extend(attach_lora(m, seed=i, in_features=n_in, out_features=n_out).parameters())
        return params


@functools.cache
def _gptq_dir() -> str:
    fx = _fixtures()
    root = tempfile.mkdtemp(prefix="kbitprep-conformance-gptq-")
    atexit.register(shutil.rmtree, root, True)
    return fx.quantize_gptq(_saved("float16"), str(Path(root) / "gptq"))  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.skipif(_maybe("gptq") is None, reason="kbitprep.backends.gptq is not written yet")
@_needs("gptqmodel", "optimum")
class TestGptqTorchKernel(BackendConformanceTests):
    """The tiny Llama quantized by gptqmodel on CPU (4 bits, group 32): buffers-only storage (C05)."""

    backend_cls = _maybe("gptq") or QuantBackend

    def make_model(self) -> nn.Module:
        return _fixtures().from_pretrained(_gptq_dir(), torch.float16)  # type: ignore[no-any-return]


@functools.cache
def _aqlm_dir() -> str:
    root = tempfile.mkdtemp(prefix="kbitprep-conformance-aqlm-")
    atexit.register(shutil.rmtree, root, True)
    return _fixtures().write_aqlm_checkpoint(  # type: ignore[no-any-return]
        str(Path(root) / "aqlm-1x16"), num_codebooks=1, nbits=16, not_to_quantize=["lm_head"]
    )


@pytest.mark.skipif(_maybe("aqlm") is None, reason="kbitprep.backends.aqlm is not written yet")
@_needs("aqlm")
@pytest.mark.skipif(
    transformers_major() < 5,
    reason="on transformers 4.57 the synthesized 1x16/2x8 checkpoints load with lm_head converted to AQLM as well (15 layers): the C17 expectations of a plain lm_head hold on transformers 5",
)
class TestAqlm1x16(BackendConformanceTests):
    """A synthesized 1x16 AQLM checkpoint, the codebook layout that trains on CPU (C17)."""

    backend_cls = _maybe("aqlm") or QuantBackend

    def make_model(self) -> nn.Module:
        return _fixtures().from_pretrained(_aqlm_dir(), torch.float32)  # type: ignore[no-any-return]


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
    import subprocess

    code = "import sys, kbitprep; print(sorted(m for m in ('kbitprep.testing', 'pytest') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
