"""The meta-device working copy the estimate traces: quantized as transformers would quantize it,
prepared by kbitprep's own planner, with the adapter attached by peft, and its optimizer.

Nothing here allocates weight memory: every parameter, packed 4-bit or 8-bit weight and
quantization state lives on the meta device, with the shape and dtype the loaded model has.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError
from kbitprep._hf import unwrap_model

__all__ = [
    "OPTIMIZERS",
    "attach_adapter",
    "example_batch",
    "make_optimizer",
    "meta_working_copy",
    "resident_tensors",
]

OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")

QUANTIZED = "quantized storage"
WEIGHTS = "other weights"
ADAPTERS = "adapter parameters"
STATES = "optimizer states"


# -- quantization config ----------------------------------------------------------------------

# the quantization methods the estimate builds on the meta device, and the library each needs
METHODS = {
    "bitsandbytes": ("bitsandbytes", "pip install 'kbitprep[bnb]'"),
    "gptq": ("gptqmodel", "pip install gptqmodel optimum"),
    "awq": ("gptqmodel", "pip install gptqmodel"),
    "torchao": ("torchao", "pip install torchao"),
}


def _method(qc: Any) -> str:
    raw = qc.get("quant_method", "") if isinstance(qc, Mapping) else getattr(qc, "quant_method", "")
    return str(getattr(raw, "value", raw))  # transformers' QuantizationMethod is a str Enum


def method_of(quantization_config: Any) -> str | None:
    """The quantization method a config describes (``"bitsandbytes"``, ``"gptq"``, ``"awq"``,
    ``"torchao"``), None for no config.

    Raises:
        InvalidArgumentError: A method the estimate does not build.
    """
    if quantization_config is None:
        return None
    method = _method(quantization_config)
    if isinstance(quantization_config, Mapping) and not method:
        method = "bitsandbytes"  # a bare {"load_in_4bit": True, ...}
    method = "bitsandbytes" if "bitsandbytes" in method else method
    if method not in METHODS:
        raise InvalidArgumentError(_unsupported_method(method or type(quantization_config).__name__))
    return method


def transformers_config(quantization_config: Any) -> Any | None:
    """``quantization_config`` (a transformers quantization config or its dict form, or None) as
    the transformers config object; None for an unquantized model.

    Raises:
        InvalidArgumentError: A method the estimate does not build, a ``BitsAndBytesConfig`` with
            neither 4-bit nor 8-bit set, or a torchao config that maps names to configs.
    """
    method = method_of(quantization_config)
    if method is None:
        return None
    qc = quantization_config
    if isinstance(qc, Mapping):
        from transformers.quantizers.auto import AutoQuantizationConfig

        data = dict(qc)
        data.setdefault("quant_method", "bitsandbytes")
        qc = AutoQuantizationConfig.from_dict(data)
    if method == "bitsandbytes" and not (qc.load_in_4bit or qc.load_in_8bit):
        raise InvalidArgumentError(
            "quantization_config is a BitsAndBytesConfig with neither load_in_4bit nor load_in_8bit set; "
            "set one (e.g. BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')) or pass "
            "quantization_config=None for an unquantized model."
        )
    if method == "torchao" and type(qc.get_apply_tensor_subclass()).__name__ == "FqnToConfig":
        raise InvalidArgumentError(
            "kbitprep.estimate builds a torchao quantization with one config for every linear layer; this "
            "TorchAoConfig maps module names to configs (FqnToConfig). Pass the config most layers get, e.g. "
            "TorchAoConfig(Int8WeightOnlyConfig())."
        )
    return qc


def bnb_config(quantization_config: Any) -> Any | None:
    """The ``BitsAndBytesConfig`` of ``quantization_config``, None when it is not bitsandbytes."""
    qc = transformers_config(quantization_config)
    return qc if method_of(qc) == "bitsandbytes" else None


def _unsupported_method(method: str) -> str:
    return (
        f"kbitprep.estimate models bitsandbytes 4-bit (nf4/fp4) and 8-bit (LLM.int8), GPTQ and AWQ (gptqmodel "
        f"layers), torchao weight quantization and unquantized models; the quantization_config says {method!r}. "
        "Pass one of BitsAndBytesConfig, GPTQConfig, AwqConfig, TorchAoConfig (or its dict), or "
        "quantization_config=None to estimate the unquantized model."
    )


# -- the working copy -------------------------------------------------------------------------


def _is_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The checkpoint dtype: on a meta model the dtype most parameter elements have (what the
    caller built it in); on a loaded model, whose parameters a quantizer or a preparation may
    have changed, its config's ``dtype``."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dominant = max(counts, key=counts.__getitem__) if counts else torch.float32
    if _is_meta(model):
        return dominant
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else dominant


def meta_working_copy(model: nn.Module, quantization_config: Any) -> tuple[nn.Module, Any | None]:
    """A meta-device copy of ``model`` (a deep copy when it is on the meta device already, else
    rebuilt from its config), quantized as ``quantization_config`` says, as transformers 5.24
    ``from_pretrained`` would quantize it: its own quantizer chooses the layers. bitsandbytes
    packs each weight on the meta device; GPTQ and AWQ get the gptqmodel layers a pre-quantized
    checkpoint loads into (their packed buffers on the meta device); torchao's ``quantize_``
    builds its tensor subclass from the meta weight.

    Returns:
        ``(copy, config)``: ``config`` is the transformers quantization config applied, or None.
    """
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if quantization_config is None and config is not None:
        quantization_config = getattr(config, "quantization_config", None)
    qc = transformers_config(quantization_config)
    dtype = _float_dtype(base)
    work = copy.deepcopy(base) if _is_meta(base) else _rebuild(base, dtype)
    method = method_of(qc)
    if method == "bitsandbytes":
        _quantize(work, qc, dtype)
    elif method in ("gptq", "awq"):
        _quantize_gptqmodel(work, qc, dtype)
    elif method == "torchao":
        _quantize_torchao(work, qc, dtype)
    return work, qc


def _rebuild(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    from_config = getattr(type(base), "_from_config", None)
    config = getattr(base, "config", None)
    if from_config is None or config is None:
        raise InvalidArgumentError(
            f"kbitprep.estimate traces a meta-device copy of the model, and {type(base).__name__} is not on the "
            "meta device and has no transformers config to rebuild it from. Build it on the meta device "
            "(with torch.device('meta'): ...) and pass that."
        )
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        rebuilt: nn.Module = from_config(config, dtype=dtype)
    return rebuilt


def _quantize(work: nn.Module, qc: Any, dtype: torch.dtype) -> None:
    bnb: Any = importlib.import_module("bitsandbytes")
    quantizers: Any = importlib.import_module("transformers.quantizers")

    quantizer = quantizers.AutoHfQuantizer.from_config(qc, pre_quantized=False)
    has_layers = any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in work.modules())
    if not has_layers:
        quantizer.preprocess_model(work, device_map={"": "cpu"}, dtype=dtype)
    for module in work.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _pack_4bit(module, dtype)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            _pack_8bit(module, dtype)
    quantizer.postprocess_model(work)
    work.hf_quantizer = quantizer  # type: ignore[assignment]


def _quantize_gptqmodel(work: nn.Module, qc: Any, dtype: torch.dtype) -> None:
    """The layers a pre-quantized GPTQ / AWQ checkpoint loads into: transformers' quantizer
    (through optimum for GPTQ) swaps each linear layer it would quantize for the gptqmodel layer
    its kernel selection picks, with ``qweight`` / ``qzeros`` / ``scales`` (and GPTQ's ``g_idx``)
    buffers of the packed shapes, here on the meta device."""
    quantizers: Any = importlib.import_module("transformers.quantizers")

    # gptqmodel prints a banner and its kernel choices to stdout; they are not the caller's output
    # (``kbitprep estimate --json`` writes JSON there)
    with contextlib.redirect_stdout(sys.stderr), torch.device("meta"):
        quantizer = quantizers.AutoHfQuantizer.from_config(qc, pre_quantized=True)
        quantizer.preprocess_model(work, device_map={"": "cpu"}, dtype=dtype)
        quantizer.postprocess_model(work)
    work.hf_quantizer = quantizer  # type: ignore[assignment]


def _quantize_torchao(work: nn.Module, qc: Any, dtype: torch.dtype) -> None:
    """torchao's ``quantize_`` on every weight transformers' ``TorchAoHfQuantizer`` would
    quantize at load (the linear layers outside ``modules_to_not_convert``; lm_head stays)."""
    quantizers: Any = importlib.import_module("transformers.quantizers")
    quantization: Any = importlib.import_module("torchao.quantization")

    quantizer = quantizers.AutoHfQuantizer.from_config(qc, pre_quantized=False)
    quantizer.preprocess_model(work, device_map={"": "cpu"}, dtype=dtype)
    config = qc.get_apply_tensor_subclass()
    names = [n for n, _ in work.named_parameters() if quantizer.param_needs_quantization(work, n)]
    for name in names:
        module = work.get_submodule(name.rpartition(".")[0])
        quantization.quantize_(module, config)
    quantizer.postprocess_model(work)
    work.hf_quantizer = quantizer  # type: ignore[assignment]


def _pack_4bit(module: Any, dtype: torch.dtype) -> None:
    bnb: Any = importlib.import_module("bitsandbytes")

    old = module.weight
    if getattr(old, "bnb_quantized", False):
        return
    # from_pretrained quantizes the checkpoint's weight (in the load dtype) with the layer's settings
    # (bitsandbytes 0.50 Params4bit._quantize -> functional.quantize_4bit), here on the meta device
    weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")
    packed = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=getattr(old, "blocksize", None),
        compress_statistics=getattr(old, "compress_statistics", True),
        quant_type=getattr(old, "quant_type", "fp4"),
        quant_storage=getattr(old, "quant_storage", torch.uint8),
        module=module,
    )
    packed._quantize(torch.device("meta"))
    module.weight = packed
    _bias_to(module, dtype)


def _pack_8bit(module: Any, dtype: torch.dtype) -> None:
    bnb: Any = importlib.import_module("bitsandbytes")

    old = module.weight
    if old.dtype == torch.int8 and getattr(old, "SCB", None) is not None:
        return
    weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")
    packed = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    packed._quantize(torch.device("meta"))
    module.weight = packed
    _bias_to(module, dtype)


def _bias_to(module: nn.Module, dtype: torch.dtype) -> None:
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.dtype != dtype:
        module.bias = nn.Parameter(torch.empty_like(bias, dtype=dtype), requires_grad=bias.requires_grad)


# -- adapter and optimizer ----------------------------------------------------------------------


def attach_adapter(work: nn.Module, adapter: Any) -> nn.Module:
    """``peft.get_peft_model(work, adapter)`` with the adapter's weights created on the meta
    device; ``adapter=None`` is peft's ``LoraConfig()`` (r=8, the architecture's default
    target modules).

    Raises:
        InvalidArgumentError: ``adapter`` is not a peft config, or peft refuses it.
    """
    from peft import LoraConfig, PeftConfig, get_peft_model

    if adapter is None:
        adapter = LoraConfig()
    if not isinstance(adapter, PeftConfig):
        raise InvalidArgumentError(
            f"adapter must be a peft config such as peft.LoraConfig(r=16, target_modules='all-linear'); "
            f"got {type(adapter).__name__}."
        )
    adapter = copy.deepcopy(adapter)  # peft writes into the config it is given
    try:
        with torch.device("meta"):
            wrapped: nn.Module = get_peft_model(work, adapter)  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgumentError(
            f"peft could not attach the adapter to {type(work).__name__}: {exc} Check target_modules and "
            "modules_to_save against the model's module names."
        ) from exc
    return wrapped


def make_optimizer(params: list[nn.Parameter], name: str, device: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``: ``adamw`` (``torch.optim.AdamW``, two states of
    each parameter's dtype; its multi-tensor ``foreach`` implementation on CUDA, the loop over
    parameters on the CPU, as PyTorch chooses by default), ``adamw_8bit``
    (``bitsandbytes.optim.AdamW8bit``: uint8 states in blocks of 256 with an fp32 absmax each,
    32-bit states below 4096 elements) or ``sgd`` (``torch.optim.SGD`` without momentum: no
    state)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=device == "cuda")
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    bnb: Any = importlib.import_module("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=1e-4)  # type: ignore[no-any-return]


def prime_optimizer(opt: torch.optim.Optimizer) -> None:
    """Create the optimizer states a first step creates, without running it: torch's AdamW
    states as ``torch.optim.AdamW._init_group`` makes them (a CPU fp32 ``step`` and two
    ``zeros_like`` moments); other optimizers take one step on zero gradients."""
    if type(opt) is torch.optim.AdamW:
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # torch's rule

        for group in opt.param_groups:
            for p in group["params"]:
                if p in opt.state and opt.state[p]:
                    continue
                state: dict[str, Any] = {
                    "step": torch.tensor(0.0, dtype=scalar_dtype, device="cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                opt.state[p] = state
        return
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``, each once."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# -- the batch ----------------------------------------------------------------------------------


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _image_tokens(config: Any) -> tuple[int, int, int] | None:
    """``(image_token_id, tokens per image, image size)`` of a Llava-style model, else None."""
    vision = getattr(config, "vision_config", None)
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if vision is None or token is None:
        return None
    size = int(getattr(vision, "image_size", 224))
    patch = int(getattr(vision, "patch_size", 14))
    per_image = getattr(config, "image_seq_length", None) or (size // patch) ** 2
    return int(token), int(per_image), size


def example_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A training batch for ``model`` on the CPU (real values; the estimate moves it to the
    meta device with these values as shadows). Causal LMs: ``input_ids`` and ``labels`` of
    ``[batch_size, seq_len]`` (int64). Encoder-decoders: the same, labels as long as the input.
    Sequence classifiers: ``labels`` of ``[batch_size]``. Llava-style models: one image per
    sequence (``pixel_values`` fp32 ``[batch_size, 3, size, size]``) whose tokens open the
    sequence, text after it.

    Raises:
        InvalidArgumentError: ``seq_len`` cannot hold the image tokens.
    """
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    vocab = int(getattr(_text_config(config), "vocab_size", 0) or getattr(config, "vocab_size", 0) or 32000)
    g = torch.Generator().manual_seed(0)
    image = _image_tokens(config) if config is not None else None
    high = vocab
    if image is not None and image[0] < vocab:
        high = image[0]
    ids = torch.randint(1, max(high, 2), (batch_size, seq_len), generator=g)
    batch: dict[str, torch.Tensor] = {"input_ids": ids}
    if image is not None:
        token, per_image, size = image
        if seq_len < per_image + 2:
            raise InvalidArgumentError(
                f"seq_len={seq_len} cannot hold one image ({per_image} image tokens for this model) and "
                f"text; pass seq_len >= {per_image + 2}."
            )
        ids[:, 1 : 1 + per_image] = token
        batch["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=g)
    if type(base).__name__.endswith("ForSequenceClassification"):
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    else:
        batch["labels"] = ids.clone()
    return batch


# -- what lives before the step -----------------------------------------------------------------


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a bitsandbytes quantization state (``QuantState``, ``MatmulLtState``)."""
    if depth > 2 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    attrs = getattr(obj, "__dict__", None)
    if not attrs:
        return
    for value in attrs.values():
        if isinstance(value, torch.Tensor) or type(value).__name__ in ("QuantState", "MatmulLtState"):
            yield from _tensors_in(value, depth + 1)


def _is_storage(p: torch.Tensor) -> bool:
    return not p.is_floating_point() or type(p).__name__ in ("Params4bit", "Int8Params") or _is_subclass(p)


def _is_subclass(t: torch.Tensor) -> bool:
    """A traceable tensor subclass (torchao's quantized tensors) whose data are inner tensors."""
    return hasattr(type(t), "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter)


def leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``t`` itself, or the inner tensors of a traceable
    subclass (``qdata``, ``scale``, ... of torchao's ``Int8Tensor``)."""
    if not _is_subclass(t):
        yield t
        return
    names, _ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            yield from leaves(inner)


def resident_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, list[torch.Tensor]]:
    """Every tensor alive before a step, by kind: quantized storage (packed weights and their
    quantization state), other weights (floating parameters and buffers not trained), adapter
    parameters (every trainable parameter) and optimizer states."""
    kinds: dict[str, list[torch.Tensor]] = {QUANTIZED: [], WEIGHTS: [], ADAPTERS: [], STATES: []}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                kinds[ADAPTERS].append(p)
            elif _is_storage(p):
                kinds[QUANTIZED].extend(leaves(p))
                kinds[QUANTIZED].extend(_tensors_in(getattr(p, "quant_state", None)))
                for attr in ("CB", "SCB"):
                    kinds[QUANTIZED].extend(_tensors_in(getattr(p, attr, None)))
            else:
                kinds[WEIGHTS].append(p)
        buffers = list(module.buffers(recurse=False))
        # a layer holding integer buffers keeps its quantized storage in buffers (GPTQ / AWQ
        # qweight, qzeros, g_idx, with their fp16 scales)
        packed = any(not b.is_floating_point() for b in buffers)
        kinds[QUANTIZED if packed else WEIGHTS].extend(buffers)
        for attr in ("quant_state", "state"):
            value = getattr(module, attr, None)
            if type(value).__name__ in ("QuantState", "MatmulLtState"):
                kinds[QUANTIZED].extend(_tensors_in(value))
    if optimizer is not None:
        for state in optimizer.state.values():
            kinds[STATES].extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return kinds


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())
