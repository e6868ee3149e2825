"""Quantized tiny models, by library: the CPU kinds the regression cases run on (bitsandbytes,
torchao, HQQ, plus the plain and generic models, in ``CPU_KINDS``) and the real quantized tiny
models and checkpoints of tests/backends (GPTQ, AWQ, BitNet, AQLM, HQQ, EETQ); the upcast
choices and the quiet ``prepare`` those backend tests share."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _models import DECODER_LINEARS, TINY, decoder_linears, load, saved_tiny, tiny_config, tiny_llama


def need(module: str, package: str | None = None) -> None:
    """Skip when ``module`` is not installed (the reason names the package)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package or module} is not installed")


def need_strategy(name: str) -> None:
    """Skip when the kbitprep strategy module for ``name`` does not exist in this checkout."""
    if importlib.util.find_spec(f"kbitprep.backends.{name}") is None:
        pytest.skip(f"kbitprep.backends.{name} is not in this checkout yet")


def plain(root: str) -> Any:
    return load(saved_tiny(root))


def generic(root: str) -> Any:
    """A bf16 model flagged as quantized by a method kbitprep has no strategy for ("vptq"), with
    an int8 buffer standing in for that method's storage: a label with no storage behind it is
    an unquantized model (issue 12), so the storage is what makes this "generic"."""
    model = plain(root)
    model.is_quantized = True
    model.quantization_method = "vptq"
    model.model.layers[0].mlp.register_buffer("codes", torch.zeros(64, 8, dtype=torch.int8))
    return model


def strip_quantization_evidence(model: nn.Module) -> None:
    """Drop every label transformers leaves on a quantized model (``hf_quantizer``,
    ``quantization_method``, ``is_quantized``, ``config.quantization_config``): only the layers
    tell the method then, and a test sets back the one evidence tier it checks."""
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attr in vars(model):
            delattr(model, attr)
    model.config.quantization_config = None


# -- bitsandbytes ----------------------------------------------------------------------------------


def bnb4_config(**kw: Any) -> Any:
    from transformers import BitsAndBytesConfig

    args: dict[str, Any] = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    args.update(kw)
    return BitsAndBytesConfig(**args)  # type: ignore[no-untyped-call]


def bnb4(root: str, **kw: Any) -> Any:
    need("bitsandbytes")
    return load(saved_tiny(root), quantization_config=bnb4_config(**kw))


def bnb4_bf16_storage(root: str) -> Any:
    return bnb4(root, bnb_4bit_quant_storage=torch.bfloat16)


def bnb4_config_or_skip() -> Any:
    """:func:`bnb4_config`, or a skip without bitsandbytes (a config factory of a backend table)."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    return bnb4_config()


def bnb8_config_or_skip() -> Any:
    """``BitsAndBytesConfig(load_in_8bit=True)``, or a skip without bitsandbytes."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


def bnb8(root: str) -> Any:
    need("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return load(saved_tiny(root), quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # type: ignore[no-untyped-call]


# -- torchao ---------------------------------------------------------------------------------------


def torchao_hf(root: str, config: Any = None) -> Any:
    """(C07a) loaded through transformers with ``TorchAoConfig``; lm_head stays bf16."""
    need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return load(saved_tiny(root), quantization_config=TorchAoConfig(config or Int8WeightOnlyConfig()))


def torchao_int8_config_or_skip() -> Any:
    """``TorchAoConfig(Int8WeightOnlyConfig())``, or a skip without torchao."""
    pytest.importorskip("torchao", reason="needs torchao (pip install torchao)")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def torchao_direct(root: str, config: Any = None) -> Any:
    """(C07b) ``quantize_`` applied directly: no transformers attributes; lm_head quantized too."""
    need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = plain(root)
    quantize_(model, config or Int8WeightOnlyConfig())
    return model


def intx_config() -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))  # type: ignore[attr-defined]


def torchao_direct_intx(root: str) -> Any:
    """(C07c) ``quantize_`` with intx int4 weight-only."""
    need("torchao")
    return torchao_direct(root, intx_config())


# -- HQQ -------------------------------------------------------------------------------------------


def hqq_direct(root: str) -> Any:
    """Decoder linears swapped for ``HQQLinear`` (backend PYTORCH), no transformers attributes."""
    need("hqq")
    need_strategy("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = plain(root)
    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = HQQLinear(child, cfg, compute_dtype=torch.bfloat16, device="cpu")
                    setattr(parent, child_name, q)
    return model


def hqq_tiny(compute_dtype: torch.dtype = torch.bfloat16, model_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The C08/C15 model: tiny Llama in ``model_dtype`` with its 14 decoder linears replaced by
    ``HQQLinear`` (4 bits, group 64, PYTORCH backend, optimizer step off for speed); no
    transformers quantization attribute is set."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = tiny_llama(model_dtype)
    qcfg = BaseQuantizeConfig(nbits=4, group_size=64)
    qcfg["weight_quant_params"]["optimize"] = False
    for name, linear in decoder_linears(model):
        layer = HQQLinear(linear, qcfg, compute_dtype=compute_dtype, device="cpu")
        model.set_submodule(name, layer)
    return model


# -- the CPU kinds of the regression cases ---------------------------------------------------------


# every backend whose real layers run on CPU; gptq / aqlm / eetq are covered by their own cases
CPU_KINDS: dict[str, Callable[[str], Any]] = {
    "none": plain,
    "generic": generic,
    "bnb4": bnb4,
    "bnb4_bf16_storage": bnb4_bf16_storage,
    "bnb8": bnb8,
    "torchao_hf": torchao_hf,
    "torchao_direct": torchao_direct,
    "torchao_direct_intx": torchao_direct_intx,
    "hqq": hqq_direct,
}


EXPECTED_BACKEND = {
    "none": "none",
    "generic": "generic",
    "bnb4": "bitsandbytes",
    "bnb4_bf16_storage": "bitsandbytes",
    "bnb8": "bitsandbytes",
    "torchao_hf": "torchao",
    "torchao_direct": "torchao",
    "torchao_direct_intx": "torchao",
    "hqq": "hqq",
}
QUANTIZED_KINDS = [k for k in CPU_KINDS if k not in ("none",)]


# -- GPTQ ------------------------------------------------------------------------------------------


def word_tokenizer() -> Any:
    """A word-level tokenizer built locally with ``tokenizers``: "w<i>" -> id i (1..999), unk 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1, TINY["vocab_size"])}
    vocab["<unk>"] = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def calibration_texts(n: int = 16, length: int = 32) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(f"w{int(i)}" for i in torch.randint(4, TINY["vocab_size"], (length,), generator=g)) for _ in range(n)
    ]


def quantize_gptq(src: str, dst: str, device_map: str = "cpu") -> str:
    """Quantize the fp16 tiny model at ``src`` with gptqmodel (4 bits, group 32) and save to ``dst``."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    if (Path(dst) / "config.json").exists():
        return dst
    cfg = GPTQConfig(
        bits=4, group_size=32, desc_act=False, sym=True, dataset=calibration_texts(), tokenizer=word_tokenizer()
    )
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float16, device_map=device_map, quantization_config=cfg
    )
    model.save_pretrained(dst)
    return dst


# -- AWQ -------------------------------------------------------------------------------------------


def quantize_awq(src: str, dst: str) -> str:
    """Quantize the fp16 tiny model at ``src`` to 4-bit AWQ (asymmetric, group 32) with
    auto-round 0.16.1's round-to-nearest (``iters=0``, ``disable_opt_rtn=True``: no calibration
    set is downloaded) and export it in the ``auto_awq`` format; returns the checkpoint folder."""
    import logging

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM

    found = sorted(Path(dst).glob("**/config.json"))
    if found:
        return str(found[0].parent)
    logging.getLogger("auto_round").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    rounder = AutoRound(model, word_tokenizer(), bits=4, group_size=32, sym=False, iters=0, disable_opt_rtn=True)
    rounder.quantize_and_save(dst, format="auto_awq")
    # auto-round 0.16.1 writes into a sub-folder named after the model and the scheme
    return str(sorted(Path(dst).glob("**/config.json"))[0].parent)


# -- BitNet ----------------------------------------------------------------------------------------


def write_bitnet_checkpoint(dst: str, *, linear_class: str, quantization_mode: str = "offline") -> str:
    """A pre-quantized BitNet checkpoint of the tiny Llama (bf16): each decoder linear's weight
    rounded to ternary {-1, 0, 1} after scaling by 1 / mean|w| and packed four values per uint8
    byte along the output rows (transformers 5.24 ``pack_weights`` layout: shape (out/4, in)),
    with ``weight_scale`` (bf16, shape (1,)) in the convention each layer class reads it in
    (transformers 5.24): ``BitLinear`` divides its output by it (1 / mean|w|), ``AutoBitLinear``
    multiplies by it (mean|w|), so both give y ~ x·w; float embedding, norms and lm_head.
    ``quantization_mode="online"`` (quantization-aware training) keeps every weight in bf16."""
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    path = Path(dst)
    if (path / "config.json").exists():
        return dst
    path.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(torch.bfloat16)
    tensors = {n: p.contiguous() for n, p in base.state_dict().items()}
    for name, linear in decoder_linears(base) if quantization_mode == "offline" else ():
        w = linear.weight.detach().float()
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        ternary = (w * scale).round().clamp(-1, 1)
        tensors[f"{name}.weight"] = pack_weights(ternary.clone())
        stored = scale if linear_class == "bitlinear" else 1.0 / scale
        tensors[f"{name}.weight_scale"] = stored.reshape(1).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_config().to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": quantization_mode,
    }
    (path / "config.json").write_text(json.dumps(config, default=str))
    return dst


# -- AQLM ------------------------------------------------------------------------------------------


def write_aqlm_checkpoint(
    dst: str, *, num_codebooks: int, nbits: int, not_to_quantize: list[str], seed: int = 0
) -> str:
    """Synthesize an AQLM checkpoint (C17): random codes and N(0, 0.05) codebooks, unit scales,
    in groups of 8 inputs, for the 14 decoder linears; float embedding, norms and lm_head."""
    from safetensors.torch import save_file

    path = Path(dst)
    if (path / "config.json").exists():
        return dst
    path.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    code_dtype = torch.int16 if nbits == 16 else torch.int8
    tensors: dict[str, torch.Tensor] = {}
    for name, param in base.state_dict().items():
        module = name.rpartition(".")[0]
        if module.rpartition(".")[2] in DECODER_LINEARS:
            continue
        tensors[name] = param.contiguous()
    for name, linear in decoder_linears(base):
        out_f, in_f = linear.weight.shape
        high = 2**nbits
        codes = torch.randint(0, high, (out_f, in_f // 8, num_codebooks), generator=g)
        codes = (codes - 2 ** (nbits - 1)).to(code_dtype)  # stored signed, as aqlm does
        tensors[f"{name}.codes"] = codes
        tensors[f"{name}.codebooks"] = torch.randn(num_codebooks, high, 1, 8, generator=g) * 0.05
        tensors[f"{name}.scales"] = torch.ones(out_f, 1, 1, 1)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_config().to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": 8,
        "out_group_size": 1,
        "num_codebooks": num_codebooks,
        "nbits_per_codebook": nbits,
        "linear_weights_not_to_quantize": list(not_to_quantize),
    }
    (path / "config.json").write_text(json.dumps(config, default=str))
    return dst


# -- EETQ ------------------------------------------------------------------------------------------


class FakeEetqKernels:
    """Pure-torch stand-in for the hub kernel ``kernels-community/quantization-eetq``.

    ``quant_weights(w (in, out), int8, False)`` returns per-column int8 codes and fp16 scales;
    ``w8_a16_gemm(x, w, s)`` computes ``x @ (w * s)`` in ``x``'s dtype.
    """

    @staticmethod
    def quant_weights(weight: torch.Tensor, dtype: torch.dtype, _flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float()
        scales = w.abs().amax(dim=0).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
        return q, scales.to(torch.float16)

    @staticmethod
    def w8_a16_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x @ (weight.to(x.dtype) * scales.to(x.dtype))


def eetq_tiny(dtype: torch.dtype = torch.float16, flag: str | None = "all") -> nn.Module:
    """Tiny Llama in ``dtype`` with its 14 decoder linears replaced by transformers'
    ``EetqLinear`` (int8 ``weight`` (in, out), fp16 ``weight_scales`` (out,) with
    requires_grad=True, as loading leaves it), quantized with :class:`FakeEetqKernels`.

    ``flag``: ``"all"`` sets the attributes a transformers EETQ load sets (``hf_quantizer``,
    ``config.quantization_config``, ``is_quantized``, ``quantization_method``); ``"attribute"``
    only ``quantization_method``; ``"config"`` only ``config.quantization_config``; ``None`` none.
    """
    from transformers.integrations.eetq import EetqLinear

    model = tiny_llama(dtype)
    for name, linear in decoder_linears(model):
        layer = EetqLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, s = FakeEetqKernels.quant_weights(linear.weight.detach().t().contiguous(), torch.int8, False)
        layer.weight.data = q
        layer.weight_scales.data = s
        model.set_submodule(name, layer)
    if flag in ("all", "attribute"):
        from transformers.utils.quantization_config import QuantizationMethod

        model.quantization_method = QuantizationMethod.EETQ
    if flag in ("all", "config"):
        from transformers import EetqConfig

        model.config.quantization_config = EetqConfig()
    if flag == "all":
        from transformers import EetqConfig
        from transformers.quantizers.quantizer_eetq import EetqHfQuantizer

        model.is_quantized = True
        model.hf_quantizer = EetqHfQuantizer(EetqConfig())
    return model


# -- shared by the backend tests -------------------------------------------------------------------


UPCASTS: list[Any] = ["auto", "all", lambda name, param, module: True]
UPCAST_IDS = ["auto", "all", "callable"]


def prepare_quietly(model: nn.Module, upcast: Any, **kw: Any) -> Any:
    """prepare(); ``upcast="all"`` on these backends must warn that their kernels want their own
    compute dtype (the orchestrator's MemoryWarning). Any other warning fails the test."""
    import pytest

    from kbitprep import MemoryWarning, prepare

    if upcast != "all":
        return prepare(model, upcast=upcast, **kw)
    with pytest.warns(MemoryWarning, match="expect their own compute"):
        return prepare(model, upcast=upcast, **kw)
