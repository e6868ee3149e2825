"""C19 and its whole kind: a quantization label with no quantized storage behind it.

Every method whose transformers 5.24 config offers ``dequantize=True`` and that loads on this
CPU: gpt-oss with ``Mxfp4Config(dequantize=True)`` (quantizer kept, ``is_trainable`` False), a
pre-quantized finegrained FP8 checkpoint (dequantized to bf16 on a CPU, with or without
``FineGrainedFP8Config(dequantize=True)``). ``CompressedTensorsConfig(dequantize=True)`` is in
tests/backends/test_compressed_tensors.py. Not here: ``MetalConfig`` (Apple MPS only) and
``GgufConfig`` (GGUF files are always dequantized; covered by the demo).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, standard_step
from _models import GPT_OSS, tiny_llama, transformers_major


def _load(path: Path, **kw: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cpu", **kw)  # type: ignore[no-any-return]


def mxfp4_dequantized(tmp: Path) -> nn.Module:
    if transformers_major() < 5:
        pytest.skip(
            "transformers 4.57 cannot load this gpt-oss checkpoint with Mxfp4Config(dequantize=True): its loader "
            "looks for the packed experts' *_blocks keys (KeyError); the case is transformers 5's"
        )
    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config

    torch.manual_seed(0)
    GptOssForCausalLM(GptOssConfig(**GPT_OSS)).to(torch.bfloat16).save_pretrained(tmp)
    return _load(tmp, quantization_config=Mxfp4Config(dequantize=True))


def _fp8_checkpoint(tmp: Path) -> Path:
    """A pre-quantized FP8 checkpoint: float8_e4m3fn weights and 32x32 float32 block scales."""
    from safetensors.torch import save_file

    from backends.test_fp8 import BLOCK, fp8_llama

    model = fp8_llama()
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    (tmp / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return tmp


def fp8_on_cpu(tmp: Path) -> nn.Module:
    return _load(_fp8_checkpoint(tmp))  # transformers 5.24 dequantizes FP8 when there is no GPU


def fp8_dequantized(tmp: Path) -> nn.Module:
    from transformers import FineGrainedFP8Config

    return _load(_fp8_checkpoint(tmp), quantization_config=FineGrainedFP8Config(dequantize=True))


BUILDERS: dict[str, Callable[[Path], nn.Module]] = {
    "mxfp4-dequantize": mxfp4_dequantized,
    "fp8-on-cpu": fp8_on_cpu,
    "fp8-dequantize": fp8_dequantized,
}
# the label transformers leaves on the loaded model (5.24 drops the FP8 quantizer once dequantized)
LABEL = {"mxfp4-dequantize": "'mxfp4'"}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_label_without_storage_is_unquantized_and_trains(kind: str, tmp_path: Path) -> None:
    model = BUILDERS[kind](tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no storage left
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "none"
    if kind in LABEL:
        assert LABEL[kind] in detection.reason and "dequantized" in detection.reason
    with pytest.warns(kbitprep.CheckpointingWarning, match="not quantized"):
        report = kbitprep.prepare(model, upcast="none")
    assert report.backend == "none"
    lora = add_lora(model, r=4)
    standard_step(lora)
    lora.zero_grad()
    _loss, grads = standard_step(lora)
    assert len(grads) == 8
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())


def test_mark_trainable_lets_trainer_accept_dequantized_mxfp4(tmp_path: Path) -> None:
    """transformers' check (``validate_quantization_for_training``, run by ``Trainer.__init__``)
    refuses the dequantized gpt-oss until ``mark_trainable``, which now agrees it trains."""
    if transformers_major() < 5:
        pytest.skip("validate_quantization_for_training is transformers 5's (4.57's Trainer has no such check)")
    from transformers.trainer_utils import validate_quantization_for_training

    model = mxfp4_dequantized(tmp_path)
    with pytest.warns(kbitprep.CheckpointingWarning, match="not quantized"):
        kbitprep.prepare(model, upcast="none")
    lora = add_lora(model, r=4)
    with pytest.raises(ValueError):
        validate_quantization_for_training(lora)
    with kbitprep.mark_trainable(lora) as override:
        assert override.active
        validate_quantization_for_training(lora)
    assert model.hf_quantizer.is_trainable is False  # undone on leaving the block


def test_plain_module_scale_parameter_is_not_storage() -> None:
    """The name rule needs storage in the same module: a plain ``layer_scale`` stays a float."""
    model = tiny_llama()
    norm = model.model.layers[0].input_layernorm
    norm.layer_scale = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    backend = kbitprep.get_backend("none")
    assert not backend.is_quantized_param("model.layers.0.input_layernorm.layer_scale", norm.layer_scale, norm)
    assert kbitprep.detect_backend(model).backend == "none"
    norm.register_buffer("weight_packed", torch.zeros(4, dtype=torch.int32))
    assert backend.is_quantized_param("model.layers.0.input_layernorm.layer_scale", norm.layer_scale, norm)
