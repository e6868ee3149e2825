"""AQLM strategy: synthesized aqlm 1.1.7 checkpoints loaded through transformers (C17)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("aqlm", reason="aqlm is not installed (pip install 'aqlm[cpu]')")

from _models import transformers_major  # noqa: E402

pytestmark = pytest.mark.skipif(
    transformers_major() < 5,
    reason="on transformers 4.57 the synthesized 1x16/2x8 checkpoints load with lm_head converted to AQLM as well (15 layers): the C17 expectations of a plain lm_head hold on transformers 5",
)

from _lora import add_lora, grad_counts, lora_step_trains, standard_step  # noqa: E402
from _measure import embed_hooks, storage_state  # noqa: E402
from _models import N_LINEARS, N_PLAIN, checkpointing_on, from_pretrained  # noqa: E402
from _plan_warnings import warning_of  # noqa: E402
from _quantized import UPCAST_IDS, UPCASTS, prepare_quietly  # noqa: E402
from kbitprep import NotTrainableError, detect_backend, get_backend, plan, prepare  # noqa: E402
from kbitprep.backends.aqlm import AqlmBackend  # noqa: E402
from kbitprep.testing import BackendConformanceTests  # noqa: E402

CPU_2X8_REASON = (
    "aqlm 1.1.7 runs 2x8 codebooks on CPU with a forward-only numba kernel (no backward, fp32 only); "
    "prepare refuses it with NotTrainableError, see test_aqlm_2x8_on_cpu_is_refused_before_anything_changes"
)


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    from aqlm import QuantizedLinear

    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def _checkpointing_on(model: nn.Module) -> bool:
    return checkpointing_on(model)


# -- the conformance kit (kbitprep.testing) --------------------------------------------------------


class TestAqlm1x16(BackendConformanceTests):
    """A synthesized 1x16 AQLM checkpoint, the codebook layout that trains on CPU (C17)."""

    backend_cls = AqlmBackend

    @pytest.fixture(autouse=True)
    def _aqlm_dir(self, aqlm_dirs: dict[str, str]) -> None:
        self.aqlm_dir = aqlm_dirs["a"]  # 1x16, lm_head not quantized

    def make_model(self) -> nn.Module:
        return from_pretrained(self.aqlm_dir, torch.float32)


# -- what is particular to AQLM --------------------------------------------------------------------


def test_aqlm_1x16_codes_codebooks_and_scales_are_the_storage(aqlm_dirs: dict[str, str]) -> None:
    """C17(a): backend aqlm; 42 quantized parameters (3 × 14), codebooks and scales loaded with
    requires_grad True; all 42 frozen by prepare with dtype and bytes unchanged; no warning."""
    model = from_pretrained(aqlm_dirs["a"], torch.float16)
    assert len(_quantized_layers(model)) == N_LINEARS and type(model.lm_head) is nn.Linear
    assert detect_backend(model).backend == "aqlm"
    backend = get_backend("aqlm")
    before = storage_state(model, backend)
    assert len(before) == 42
    assert {n.rpartition(".")[2] for n in before} == {"codes", "codebooks", "scales"}
    q = "model.layers.0.self_attn.q_proj"
    assert before[f"{q}.codes"][:4] == (torch.int16, (64, 8, 1), 64 * 8 * 2, False)
    assert before[f"{q}.codebooks"][:4] == (torch.float16, (1, 65536, 1, 8), 65536 * 8 * 2, True)
    assert before[f"{q}.scales"][:4] == (torch.float16, (64, 1, 1, 1), 128, True)
    p = plan(model)
    assert (p.casts, p.bytes_delta, p.warnings) == ((), 0, ())
    prepare(model)
    after = storage_state(model, backend)
    assert {n: s[:3] for n, s in after.items()} == {n: s[:3] for n, s in before.items()}
    assert {n: s[4] for n, s in after.items()} == {n: s[4] for n, s in before.items()}
    assert not any(s[3] for s in after.values())


@pytest.mark.parametrize("upcast", UPCASTS, ids=UPCAST_IDS)
def test_aqlm_storage_is_never_cast_and_lm_head_is_a_plain_cast(aqlm_dirs: dict[str, str], upcast: Any) -> None:
    """C17(a) and C06 whole kind: under auto, "all" and an always-True callable no quantized
    tensor changes dtype, shape or bytes; under "all" lm_head.weight is one of exactly 7 casts."""
    model = from_pretrained(aqlm_dirs["a"], torch.float16)
    backend = get_backend("aqlm")
    before = storage_state(model, backend)
    report = prepare_quietly(model, upcast)
    after = storage_state(model, backend)
    assert {n: (s[0], s[1], s[2], s[4]) for n, s in after.items()} == {
        n: (s[0], s[1], s[2], s[4]) for n, s in before.items()
    }
    assert not any(s[3] for s in after.values())
    names = {c.name for c in report.casts}
    if upcast == "auto":
        assert names == set()
    else:
        assert len(names) == N_PLAIN and "lm_head.weight" in names
        assert not any(n.rpartition(".")[2] in ("codes", "codebooks", "scales") for n in names)


def test_aqlm_1x16_trains_one_step_with_lora(aqlm_dirs: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """C17(a): prepare, standard LoRA (AqlmLoraLinear), standard step: 8 with grad, 4 non-zero."""
    model = from_pretrained(aqlm_dirs["a"], torch.float16)
    report = prepare(model)
    assert report.backend == "aqlm" and report.casts == () and report.warnings == ()
    peft_model = add_lora(model)
    assert sum(type(m).__name__ == "AqlmLoraLinear" for m in peft_model.modules()) == 4
    loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    with capsys.disabled():
        print(f"\n[aqlm C17-a] loss={loss:.4f} grad_counts={grad_counts(grads)}")


def test_aqlm_lm_head_excluded_as_weight_name_is_read_from_modules_and_warned(aqlm_dirs: dict[str, str]) -> None:
    """C17(b): the list says "lm_head.weight", but transformers converted lm_head: its tensors
    count as quantized (45 in all), "all" casts exactly 6 (not lm_head), and plan.warnings names lm_head."""
    model = from_pretrained(aqlm_dirs["b"], torch.float16)
    assert len(_quantized_layers(model)) == N_LINEARS + 1
    backend = get_backend("aqlm")
    assert len(storage_state(model, backend)) == 45
    p = plan(model, upcast="all")
    assert len(p.casts) == 6
    assert not any(c.name.startswith("lm_head") for c in p.casts)
    assert "AQLM QuantizedLinear" in warning_of(p, "backend", "'lm_head.weight'")
    auto = plan(model)
    assert auto.casts == ()
    warning_of(auto, "backend", "lm_head")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["c-fp32", "d-fp16"])
def test_aqlm_2x8_on_cpu_is_refused_before_anything_changes(aqlm_dirs: dict[str, str], dtype: torch.dtype) -> None:
    """C17(c, d): NotTrainableError naming the 2x8 layout and CPU; codebooks keep requires_grad
    True, no hook is added, checkpointing stays off, and codes keep their (out, in/8, 2) shape."""
    model = from_pretrained(aqlm_dirs["c"], dtype)
    layers = _quantized_layers(model)
    assert len(layers) == N_LINEARS
    hooks = embed_hooks(model)
    with pytest.raises(NotTrainableError) as info:
        prepare(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert "2x8" in str(info.value) and "CPU" in str(info.value) and "14 AQLM layers" in str(info.value)
    assert all(m.codebooks.requires_grad for m in layers)
    assert embed_hooks(model) == hooks
    assert not _checkpointing_on(model)
    q = model.model.layers[0].self_attn.q_proj
    assert tuple(q.codes.shape) == (64, 8, 2) and q.codes.dtype == torch.int8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_aqlm_2x8_trains_one_step(aqlm_dirs: dict[str, str], device: str) -> None:
    """C17(c) on a device whose kernel has a backward: prepare, LoRA, one step with grads."""
    if device == "cpu":
        pytest.skip(CPU_2X8_REASON)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(aqlm_dirs["c"], dtype=torch.float16, device_map=device)
    report = prepare(model)
    assert report.casts == ()
    lora_step_trains(model, device)


@pytest.mark.gpu
def test_aqlm_1x16_on_cuda_trains_one_step(aqlm_dirs: dict[str, str]) -> None:
    """C17(a) on CUDA (aqlm's CUDA kernels)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(aqlm_dirs["a"], dtype=torch.float16, device_map="cuda")
    backend = get_backend("aqlm")
    before = storage_state(model, backend)
    report = prepare(model)
    assert report.casts == ()
    lora_step_trains(model)
    after = storage_state(model, backend)
    assert {n: s[4] for n, s in after.items()} == {n: s[4] for n, s in before.items()}
