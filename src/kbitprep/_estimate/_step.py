"""One training step as ``transformers.Trainer`` runs it, with the phases of the step named.

The step is what the estimate predicts and what the tests measure: ``loss = model(**batch).loss``
(the model output, logits included, is dropped before the backward, as ``Trainer.compute_loss``
returns only the loss), ``loss.backward()``, ``optimizer.step()``,
``optimizer.zero_grad(set_to_none=True)``. Forward hooks on the repeated blocks (transformers'
``GradientCheckpointingLayer``) and gradient hooks on their outputs name the phase the tracker is
in: ``forward of block 3 (model.layers.3)``, ``backward of the loss``, ``recompute of block 3
(...)``, ``backward of block 3 (...)``, ``optimizer step``. The hooks only read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kbitprep._estimate._trace import LiveBytes

__all__ = ["FORWARD_END", "LOSS_BACKWARD", "OPTIMIZER", "blocks", "named_phases", "train_step"]

FORWARD_END = "end of forward"
LOSS_BACKWARD = "backward of the loss"
OPTIMIZER = "optimizer step"


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model`` in module order: transformers'
    ``GradientCheckpointingLayer`` instances (outermost only), else the children of its
    longest ``nn.ModuleList``. Names are relative to the transformers model inside a peft
    wrapper."""
    found: list[tuple[str, nn.Module]] = []
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        layer_cls: tuple[type[nn.Module], ...] = ()
    else:
        layer_cls = (GradientCheckpointingLayer,)
    inside: list[str] = []
    for name, module in model.named_modules():
        if layer_cls and isinstance(module, layer_cls) and not any(name.startswith(p + ".") for p in inside):
            found.append((name, module))
            inside.append(name)
    if not found:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        if lists:
            name, longest = max(lists, key=lambda nm: len(nm[1]))
            found = [(f"{name}.{i}", child) for i, child in enumerate(longest.children())]
    return [(_strip_peft(n), m) for n, m in found]


def _strip_peft(name: str) -> str:
    return name.removeprefix("base_model.model.")


@contextmanager
def named_phases(model: nn.Module, tracker: LiveBytes, state: dict[str, bool]) -> Iterator[None]:
    """Name the tracker's phases from the blocks' forward hooks and output gradient hooks.
    ``state["backward"]`` tells the hooks whether the autograd backward is running."""
    handles: list[Any] = []
    for index, (name, module) in enumerate(blocks(model)):
        label = f"block {index} ({name})"
        handles.append(module.register_forward_pre_hook(_pre_hook(tracker, state, label)))
        handles.append(module.register_forward_hook(_post_hook(tracker, state, label)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pre_hook(tracker: LiveBytes, state: dict[str, bool], label: str) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: Any) -> None:
        tracker.set_phase(f"recompute of {label}" if state["backward"] else f"forward of {label}")

    return hook


def _post_hook(tracker: LiveBytes, state: dict[str, bool], label: str) -> Callable[..., None]:
    def on_grad(_grad: torch.Tensor) -> None:
        tracker.set_phase(f"backward of {label}")

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if state["backward"]:
            tracker.set_phase(f"backward of {label}")
            return
        tracker.set_phase(f"forward after {label}")
        first: Any = _first_grad_tensor(output)
        if first is not None:
            first.register_hook(on_grad)

    return hook


def _first_grad_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_grad_tensor(item)
            if found is not None:
                return found
    return None


def loss_of(output: Any) -> Any:
    """The loss a transformers model returns when given labels."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the model returned no loss ({type(output).__name__}); it needs labels in the batch")
    return loss


def train_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    tracker: LiveBytes | None = None,
) -> None:
    """One training step (module docstring); phases named on ``tracker`` when given. The
    tracker mode must already be active (``with tracker:``) for its counts to cover the step."""
    model.train()
    if tracker is None:
        _plain_step(model, batch, optimizer)
        return
    state = {"backward": False}
    with named_phases(model, tracker, state):
        tracker.set_phase("forward", kind="forward")
        loss = loss_of(model(**batch))
        tracker.set_phase(FORWARD_END)
        state["backward"] = True
        tracker.set_phase(LOSS_BACKWARD, kind="backward")
        loss.backward()
        del loss
        state["backward"] = False
        tracker.set_phase(OPTIMIZER, kind="optimizer step")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.set_phase("end of step")


def _plain_step(model: nn.Module, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    loss = loss_of(model(**batch))
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
