"""Selective checkpointing layouts: ``checkpoint_trainable_blocks_only`` and
``checkpoint_every_n_layers`` (the blocks before the first block holding a trainable parameter
run without a graph, decided at each training forward)."""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from kbitprep.steps import checkpoint_transformers as ckpt

__all__ = ["checkpoint_blocks", "install_selective"]


def checkpoint_blocks(base: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers checkpoints (``GradientCheckpointingLayer`` instances)."""
    layers = sys.modules.get("transformers.modeling_layers")
    cls = getattr(layers, "GradientCheckpointingLayer", None)
    if cls is None:
        return []
    return [m for m in base.modules() if isinstance(m, cls)]


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


_SELECTIVE = "_kbitprep_selective"


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors in a block's arguments (one level of tuples, lists and dicts deep, as
    ``position_embeddings=(cos, sin)``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)


def _replace(value: Any, swap: Mapping[int, torch.Tensor], depth: int = 0) -> Any:
    """``value`` with each tensor whose id is in ``swap`` replaced (same nesting as :func:`_tensors`)."""
    if isinstance(value, torch.Tensor):
        return swap.get(id(value), value)
    if depth < 2 and isinstance(value, tuple):
        return tuple(_replace(v, swap, depth + 1) for v in value)
    if depth < 2 and isinstance(value, list):
        return [_replace(v, swap, depth + 1) for v in value]
    if depth < 2 and isinstance(value, dict):
        return {k: _replace(v, swap, depth + 1) for k, v in value.items()}
    return value


class _FrozenPrefix:
    """The frozen-prefix rule of the selective checkpointing layouts, for one model.

    During a training forward (train mode, grad enabled), a block that holds no trainable
    parameter and whose tensor inputs require grad only because they were marked so (the input
    embeddings' output, made to require grad by an input-grad hook: transformers'
    ``enable_input_require_grads`` or kbitprep's own) has nothing to send a gradient to: no
    trainable parameter is upstream of it or in it. It runs with grad mode off, so it builds no
    graph and keeps no activation, and it is not checkpointed (its ``gradient_checkpointing``
    flag is turned off, and back on once the prefix ends before it, unless checkpointing was set
    up anew in between). The first block that holds a trainable parameter or receives a truly
    trainable input ends the prefix for this forward: it and every block after it run as the
    checkpointing layout says; when it is checkpointed and none of its positional inputs
    requires grad (the prefix ran without a graph), its hidden state is handed on as a leaf that
    requires grad (see ``_hand_on``).

    The rule never changes a gradient: the prefix had no path to a trainable parameter. An input
    is truly trainable when its autograd graph reaches a leaf that is not marked: a trainable
    parameter, a ``requires_grad`` tensor the caller passed, a prompt encoder's output. Marked
    are the input embeddings' leaf outputs and whatever a prefix block hands on that requires
    grad (a leaf a model makes for reentrant checkpointing, such as T5's zero position bias),
    in this forward.
    """

    def __init__(self) -> None:
        self.checking = False
        self.marked: list[weakref.ref[torch.Tensor]] = []
        # id(block) -> (block, the checkpoint function in place when its flag was turned off)
        self.off: dict[int, tuple[nn.Module, Any]] = {}
        self.now: set[int] = set()  # the blocks of this forward's prefix
        self.paused: set[int] = set()  # prefix blocks running now, grad mode off

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the weak references of the forward in progress."""
        return {"checking": False, "marked": [], "off": self.off, "now": set(), "paused": set()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.off = {id(block): (block, func) for block, func in self.off.values()}  # keyed by the new blocks

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrozenPrefix:
        """A copy for the copied model (its blocks, found through ``memo``), with no forward in
        progress; registered in ``memo`` first, as the blocks' hooks refer back to it."""
        new = _FrozenPrefix()
        memo[id(self)] = new
        copied = copy.deepcopy(list(self.off.values()), memo)
        new.off = {id(block): (block, func) for block, func in copied}
        return new

    # -- hooks ----------------------------------------------------------------------------------

    def start(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: a new forward starts checking from the first block."""
        self.checking = module.training and torch.is_grad_enabled()
        self.marked.clear()
        self.now.clear()

    def record(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of each input embedding: a leaf output (the embedding is frozen) that
        requires grad does so only because an input-grad hook says so, before or after this one."""
        if self.checking and isinstance(output, torch.Tensor) and output.grad_fn is None:
            self.marked.append(weakref.ref(output))

    def enter(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward pre-hook of each block (with kwargs): run a frozen prefix block without
        building a graph, or end the prefix."""
        if not self.checking or not block.training or not torch.is_grad_enabled():
            return None
        grads = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        if not _has_trainable(block) and not self._any_trainable_path(grads):
            self._turn_off(block)
            self.paused.add(id(block))
            torch.set_grad_enabled(False)
            return None
        self.checking = False
        self._turn_back_on(keep=self.now)
        return self._hand_on(block, args, kwargs)

    def leave(self, block: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of each block (always called): after a prefix block, turn grad mode back
        on, record what it hands on that requires grad (a leaf a model makes inside for reentrant
        checkpointing, such as T5's zero position bias) as marked, and release what peft's aLoRA
        registered for the recompute of a checkpointed block
        (``_peft_gradient_checkpointing_forward_hooks``): the full backward hook that removes them
        never fires on a block that built no graph, and peft refuses the block's next forward
        while they are left."""
        if id(block) not in self.paused:
            return
        self.paused.discard(id(block))
        torch.set_grad_enabled(True)
        self.marked.extend(weakref.ref(t) for t in _tensors(output) if t.requires_grad)
        handles = getattr(block, "_peft_gradient_checkpointing_forward_hooks", None)
        while isinstance(handles, list) and handles:
            handle = handles.pop()
            if isinstance(handle, torch.utils.hooks.RemovableHandle):
                handle.remove()

    # -- helpers --------------------------------------------------------------------------------

    def _any_trainable_path(self, grads: list[torch.Tensor]) -> bool:
        if not grads:
            return False
        marked = {id(t) for t in (ref() for ref in self.marked) if t is not None}
        seen: dict[int, Any] = {}
        stack: list[Any] = []
        for t in grads:
            if t.grad_fn is None:
                if id(t) not in marked:
                    return True
            else:
                stack.append(t.grad_fn)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node  # held, so that ids stay unique during the walk
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
            if isinstance(variable, torch.Tensor):
                if id(variable) not in marked:
                    return True
                continue
            stack.extend(n for n, _i in node.next_functions if n is not None)
        return False

    def _turn_off(self, block: nn.Module) -> None:
        layer: Any = block
        self.now.add(id(block))
        if layer.gradient_checkpointing:
            layer.gradient_checkpointing = False
            self.off[id(block)] = (block, getattr(block, "_gradient_checkpointing_func", None))

    def _turn_back_on(self, keep: set[int] | frozenset[int] = frozenset()) -> None:
        """Blocks of an earlier prefix that are not in this one (``keep``) are checkpointed again
        as the layout says; not when checkpointing was set up anew (or turned off) since, which
        replaces the checkpoint function."""
        for key, (block, func) in list(self.off.items()):
            if key in keep:
                continue
            layer: Any = block
            if getattr(block, "_gradient_checkpointing_func", None) is func:
                layer.gradient_checkpointing = True
            del self.off[key]

    def _hand_on(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A checkpointed block after a detached prefix gets its hidden state as a leaf that
        requires grad, as it would have without the rule: reentrant checkpointing records no
        backward otherwise, and peft's aLoRA under non-reentrant checkpointing removes its
        per-forward hooks from a full backward hook that, without an input requiring grad, fires
        before the recompute (a ``CheckpointError``)."""
        layer: Any = block
        if not layer.gradient_checkpointing:
            return None
        positional = [t for t in _tensors(args) if t.is_floating_point()]
        if not positional or any(t.requires_grad for t in positional):
            return None
        hidden = positional[0]
        return _replace(args, {id(hidden): hidden.detach().requires_grad_(True)}), kwargs

    def restore(self) -> None:
        """Undo: the flags this rule turned off are turned back on."""
        self._turn_back_on()


def install_selective(base: nn.Module, log_add: Callable[[Callable[[], None]], None]) -> bool:
    """Install the frozen-prefix rule of the selective layouts on ``base`` (see
    :class:`_FrozenPrefix`): ``checkpoint_trainable_blocks_only`` (every block from the first
    trainable one on checkpointed) and ``checkpoint_every_n_layers`` (every n-th block, as
    transformers sets the flags).

    Adapters are usually attached after ``prepare``, so the rule is applied at each training
    forward: a forward pre-hook on ``base`` starts it, a forward hook on each input embedding
    records the outputs an input-grad hook marks, a forward pre-hook on each block decides, and
    a forward hook on each block tidies after a prefix block.

    Returns:
        Whether the hooks were installed now (False when present already, e.g. a second
        ``prepare``, or when the model has no checkpointed blocks).
    """
    blocks = checkpoint_blocks(base)
    if not blocks or _SELECTIVE in vars(base):
        return False
    rule = _FrozenPrefix()
    handles = [base.register_forward_pre_hook(rule.start)]
    handles += [module.register_forward_hook(rule.record) for _n, module in ckpt.entry_modules(base)]
    handles += [block.register_forward_pre_hook(rule.enter, with_kwargs=True) for block in blocks]
    handles += [block.register_forward_hook(rule.leave, always_call=True) for block in blocks]
    setattr(base, _SELECTIVE, rule)

    def remove() -> None:
        for handle in handles:
            handle.remove()
        rule.restore()
        vars(base).pop(_SELECTIVE, None)

    log_add(remove)
    return True
