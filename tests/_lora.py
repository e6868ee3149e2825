"""peft LoRA on the tiny model and one training step: attaching adapters, the standard step
(forward/backward/AdamW) and what its LoRA gradients and parameters look like."""

from __future__ import annotations

import torch
from torch import nn

from _models import standard_batch

LORA_TARGETS = ["q_proj", "v_proj"]


def add_lora(model: nn.Module, r: int = 8) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def standard_step(model: nn.Module, lr: float = 1e-3) -> tuple[float, dict[str, torch.Tensor | None]]:
    """Train mode, one forward/backward on the standard batch, one AdamW step.

    Returns the loss and each LoRA parameter's gradient (cloned before the step)."""
    model.train()
    ids = standard_batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=lr).step()
    return float(out.loss.detach()), grads


def lora_step_trains(model: nn.Module, device: str = "cuda") -> None:
    """LoRA on the prepared ``model``, train mode, one forward/backward on the standard batch on
    ``device`` (no optimizer step): the loss is finite, all 8 LoRA tensors get a gradient, the 4
    lora_B ones non-zero."""
    peft_model = add_lora(model)
    peft_model.train()
    ids = standard_batch().to(device)
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert torch.isfinite(out.loss)
    assert grad_counts(grads) == (8, 8, 4)


def grad_counts(grads: dict[str, torch.Tensor | None]) -> tuple[int, int, int]:
    """(LoRA tensors, with a grad, lora_B grads that are non-zero)."""
    with_grad = sum(1 for g in grads.values() if g is not None)
    nonzero_b = sum(1 for n, g in grads.items() if "lora_B" in n and g is not None and bool(g.abs().sum() > 0))
    return len(grads), with_grad, nonzero_b


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_every_lora_changed(model: nn.Module, before: dict[str, torch.Tensor], layers: int = 2) -> None:
    assert len(before) == layers * 2 * len(LORA_TARGETS)  # layers x (A, B) x targets
    after = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    unchanged = [n for n, t in before.items() if torch.equal(t.to(after[n].dtype), after[n])]
    assert unchanged == []
