"""The peft internals kbitprep reads, in one place: unwrapping a ``peft.PeftModel`` and finding
the parameters of adapters already attached. peft is read only when it is already imported."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["adapter_param_ids", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (looked through), else ``model``."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, getattr(peft, "PeftModel", ())):
        wrapped: Any = model
        base: nn.Module = wrapped.get_base_model()
        return base
    return model


def adapter_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of adapters already attached: PEFT tuner layers' adapter
    sub-modules (``lora_A``, ``lora_B``, ...) and ``modules_to_save`` copies. Reads peft only
    when it is already imported (a model cannot hold its layers otherwise)."""
    peft_tuners = sys.modules.get("peft.tuners.tuners_utils")
    base_layer_cls = getattr(peft_tuners, "BaseTunerLayer", None) if peft_tuners else None
    ids: set[int] = set()
    if base_layer_cls is None:
        return ids
    peft_other = sys.modules.get("peft.utils.other")
    wrapper_cls = getattr(peft_other, "ModulesToSaveWrapper", None) if peft_other else None
    for module in model.modules():
        if isinstance(module, base_layer_cls):
            for attr in tuple(getattr(module, "adapter_layer_names", ())) + ("modules_to_save",):
                ids.update(_param_ids(getattr(module, attr, None)))
        if wrapper_cls is not None and isinstance(module, wrapper_cls):
            ids.update(_param_ids(getattr(module, "modules_to_save", None)))
    return ids


def _param_ids(sub: object) -> set[int]:
    if isinstance(sub, nn.Module):
        return {id(p) for p in sub.parameters()}
    if isinstance(sub, torch.Tensor):
        return {id(sub)}
    return set()


# -- turning checkpointing on, recorded for undo -------------------------------------------------
