"""From a ``config.json`` to an estimate: the meta model, the quantization choices of the command
line, a memory budget and the options that bring a step under it (``kbitprep estimate``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError
from kbitprep._estimate._api import estimate
from kbitprep._estimate._result import MemoryEstimate

__all__ = [
    "QUANTIZATIONS",
    "BudgetRow",
    "EstimateRequest",
    "budget_rows",
    "checkpoint_unquantized",
    "load_meta_model",
    "parse_bytes",
    "quantization_config",
]

QUANTIZATIONS = ("nf4", "fp4", "int8", "gptq", "awq", "torchao-int8", "none")
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"24GiB"`` → 25769803776. Units: B, KiB/MiB/GiB/TiB (and K/M/G/T, binary), KB/MB/GB/TB
    (decimal); case-insensitive; a plain number is bytes.

    Raises:
        InvalidArgumentError: Not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InvalidArgumentError(
            f"budget {text!r} is not a memory size; write it like 24GiB, 80GB, 16000MiB or a number of bytes."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _model_class(config: Any) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if cls is not None and hasattr(cls, "_from_config"):
            return cls
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"):
        cls = getattr(transformers, auto)
        if type(config) in cls._model_mapping:
            return cls
    raise InvalidArgumentError(
        f"No transformers model class trains {type(config).__name__} with a language-modelling loss; the "
        "config names no architectures and fits neither AutoModelForCausalLM, AutoModelForSeq2SeqLM nor "
        "AutoModelForImageTextToText."
    )


def load_meta_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``path`` (a model directory or its ``config.json``) built on the meta device
    from the config alone: no weight is read. ``dtype`` defaults to the config's ``dtype``
    (``torch_dtype``), else bfloat16.

    Raises:
        InvalidArgumentError: ``path`` holds no readable transformers config.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgumentError(
            f"Could not read a transformers config from {str(path)!r}: {exc} Pass a model directory holding "
            "config.json, or the path of a config.json."
        ) from None
    if dtype is None:
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found.removeprefix("torch."), None)
        dtype = found if isinstance(found, torch.dtype) and found.is_floating_point else torch.bfloat16
    cls = _model_class(config)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        del config.quantization_config  # applied by the estimate on its meta copy
    with torch.device("meta"):
        build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
        model: Any = build(config, dtype=dtype)
    if quantization is not None:
        model.config.quantization_config = quantization
    return model  # type: ignore[no-any-return]


def quantization_config(name: str, compute_dtype: torch.dtype, bits: int = 4, group_size: int = 128) -> Any:
    """The transformers quantization config of a ``--quantization`` choice, or None for ``none``
    (the config's own, if any): ``nf4`` / ``fp4`` (double quantization, as the demo) and
    ``int8`` (LLM.int8) as ``BitsAndBytesConfig``; ``gptq`` / ``awq`` with ``bits`` and
    ``group_size``; ``torchao-int8`` as ``TorchAoConfig(Int8WeightOnlyConfig())``.

    Raises:
        InvalidArgumentError: An unknown choice.
    """
    if name not in QUANTIZATIONS:
        raise InvalidArgumentError(f"quantization must be one of {list(QUANTIZATIONS)}; got {name!r}.")
    if name == "none":
        return None
    if name == "gptq":
        from transformers import GPTQConfig

        return GPTQConfig(bits=bits, group_size=group_size, desc_act=False, sym=True)  # type: ignore[no-untyped-call]
    if name == "awq":
        from transformers import AwqConfig

        return AwqConfig(bits=bits, group_size=group_size)  # type: ignore[no-untyped-call]
    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())  # type: ignore[no-untyped-call]
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=name,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def checkpoint_unquantized(model: nn.Module, quantization: Any, every_n_layers: int) -> bool:
    """Turn checkpointing on in an unquantized meta model, as its user would (``Trainer(...,
    gradient_checkpointing=True)``): kbitprep, as peft, leaves an unquantized model's
    checkpointing as the model has it. Returns whether it did."""
    from kbitprep.steps import checkpoint_transformers as _checkpointing

    if quantization is not None or getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return False
    if not hasattr(model, "activation_checkpointing_enable") and not hasattr(model, "gradient_checkpointing_enable"):
        return False
    _checkpointing.enable(model, {"use_reentrant": False}, every_n_layers)
    return True


@dataclass(frozen=True)
class EstimateRequest:
    """One ``kbitprep estimate`` call: the model and the options of :func:`kbitprep.estimate`."""

    model: nn.Module
    batch_size: int
    seq_len: int
    adapter: Any
    optimizer: str = "adamw"
    quantization_config: Any = None
    device: str = "cuda"
    options: dict[str, Any] = field(default_factory=dict)

    def run(self, **changes: Any) -> MemoryEstimate:
        """The estimate with some options changed (``optimizer=...`` or plan options)."""
        optimizer = changes.pop("optimizer", self.optimizer)
        options = {**self.options, **changes}
        return estimate(
            self.model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            adapter=self.adapter,
            optimizer=optimizer,
            quantization_config=self.quantization_config,
            device=self.device,
            **options,
        )


@dataclass(frozen=True)
class BudgetRow:
    """One option set tried against a budget.

    Attributes:
        label: What changes, e.g. ``"keep_in_low_precision=('lm_head', 'model.embed_tokens')"``.
        peak_bytes: The predicted peak with it.
        margin_bytes: ``budget - peak_bytes`` (negative: over the budget).
    """

    label: str
    peak_bytes: int
    margin_bytes: int

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0


def _head_and_embeddings(model: nn.Module) -> tuple[str, ...]:
    names = {id(m): n for n, m in model.named_modules()}
    found: list[str] = []
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        try:
            module = getattr(model, getter)()
        except Exception:  # custom code raises NotImplementedError and worse
            continue
        name = names.get(id(module)) if isinstance(module, nn.Module) else None
        if name and name not in found:
            found.append(name)
    return tuple(found)


def budget_rows(request: EstimateRequest, current: MemoryEstimate, budget: int) -> list[BudgetRow]:
    """The current options, then each option of kbitprep (and the 8-bit optimizer) that lowers
    the peak, alone and all together, with the predicted peak and the margin to ``budget``."""
    opts = request.options
    variants: list[tuple[str, dict[str, Any]]] = []
    if not opts.get("use_gradient_checkpointing", True) or opts.get("checkpoint_every_n_layers", 1) != 1:
        variants.append(
            ("checkpoint every block", {"use_gradient_checkpointing": True, "checkpoint_every_n_layers": 1})
        )
    keep = _head_and_embeddings(request.model)
    if keep and not opts.get("keep_in_low_precision"):
        variants.append((f"keep_in_low_precision={keep!r}", {"keep_in_low_precision": keep}))
    if opts.get("upcast", "auto") != "none":
        variants.append(("upcast='none'", {"upcast": "none"}))
    if request.optimizer == "adamw":
        variants.append(("optimizer adamw_8bit", {"optimizer": "adamw_8bit"}))
    rows = [BudgetRow("as asked", current.peak_bytes, budget - current.peak_bytes)]
    combined: dict[str, Any] = {}
    for label, change in variants:
        est = request.run(**dict(change))
        rows.append(BudgetRow(label, est.peak_bytes, budget - est.peak_bytes))
        if est.peak_bytes < current.peak_bytes:
            combined.update(change)
    if len(combined) > 1:
        est = request.run(**dict(combined))
        rows.append(BudgetRow("all of the above", est.peak_bytes, budget - est.peak_bytes))
    return rows
