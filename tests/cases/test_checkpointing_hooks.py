"""C18's kind: kbitprep never removes what the ecosystem's enabling call installs for training
to work. Activated LoRA (peft's aLoRA) puts a full backward hook on each decoder layer that
relies on the layer input requiring grad; transformers 5's activation_checkpointing_enable
installs the input-grad hook that gives it that. Over checkpointing modes x call orders x
adapter kinds, every LoRA gradient equals the one computed without checkpointing."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK
from _quantized import bnb4

TOKEN = 7


def _batch() -> torch.Tensor:
    ids = torch.randint(10, 999, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 4] = TOKEN  # the aLoRA invocation token at position 4 of every row
    return ids


def _adapter(kind: str) -> Any:
    from peft import LoraConfig

    extra: dict[str, Any] = {"alora_invocation_tokens": [TOKEN]} if kind == "alora" else {}
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        lora_dropout=0.0,
        **extra,
    )


def _grads(model: nn.Module, kind: str, order: str, mode: bool | None) -> dict[str, torch.Tensor]:
    """Prepare (in ``order``; ``mode`` None: no checkpointing), attach the adapter with fixed
    weights, one forward/backward; the LoRA gradients."""
    from peft import get_peft_model

    kwargs = None if mode is None else {"use_reentrant": mode}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        if order == "enable-then-prepare":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
        kbitprep.prepare(model, use_gradient_checkpointing=mode is not None, gradient_checkpointing_kwargs=kwargs)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, _adapter(kind))
        if order == "prepare-then-trainer-enable":  # what Trainer does at the start of train()
            peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    peft_model.train()
    ids = _batch()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.skipif(not ENABLE_ADDS_INPUT_GRAD_HOOK, reason="transformers 4.57 has no activation_checkpointing_enable")
@pytest.mark.parametrize("kind", ["alora", "lora"])
@pytest.mark.parametrize("order", ["prepare", "prepare-then-trainer-enable", "enable-then-prepare"])
@pytest.mark.parametrize("mode", [False, True], ids=["non-reentrant", "reentrant"])
def test_lora_gradients_equal_the_uncheckpointed_ones(kind: str, order: str, mode: bool, model_root: str) -> None:
    """Every LoRA gradient (8 tensors, 4 lora_B non-zero) within 1e-6 of the gradient without
    checkpointing, and the enabling call's input-grad hook still on embed_tokens."""
    plain = _grads(bnb4(model_root), kind, "prepare", None)
    model = bnb4(model_root)
    got = _grads(model, kind, order, mode)
    assert set(got) == set(plain) and len(plain) == 8
    for name, grad in plain.items():
        assert torch.max(torch.abs(got[name] - grad)).item() <= 1e-6, name
    assert sum(1 for n, g in got.items() if "lora_B" in n and bool(g.abs().sum() > 0)) == 4
    assert kbitprep.steps.checkpoint_transformers.has_input_grad_hook(model.model.embed_tokens)
