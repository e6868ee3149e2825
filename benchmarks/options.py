"""The ``options`` part of ``benchmarks/run.py`` (issue 16): what the options beyond peft cost on
the real SmolLM2-135M-Instruct in nf4.

- ``keep_numerics``: nf4 with **bf16** compute; peft, kbitprep's defaults and kbitprep with
  ``keep_in_low_precision=("lm_head", "embed_tokens")`` each take one LoRA training step on the
  same batch with the same LoRA initialisation. The step-1 losses and the logits dtypes are
  compared bit for bit, and the persistent upcast bytes against peft's.
- ``saved_bytes``: the activation bytes a training forward leaves alive for the backward, for
  LoRA on the first, a middle and the last of the 30 blocks, under every block checkpointed,
  ``checkpoint_trainable_blocks_only`` and ``checkpoint_every_n_layers=2``. Measured as live
  tensor bytes, not RSS: a ``TorchDispatchMode`` records every storage an op creates and a
  ``weakref.finalize`` forgets it when it is freed; what is alive after the forward minus what
  was alive before it is what the backward will read (the logits included), the same for every
  checkpointing mode.

Each function returns plain numbers; ``run.py`` turns them into rows.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

KEEP = ("lm_head", "embed_tokens")


class LiveBytes:
    """Bytes of the tensor storages created under :meth:`tracking` that are still alive.

    ``now`` is the current total, ``peak`` the highest it reached. Storages are told apart by
    their data pointer, so views and in-place results are counted once.
    """

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def _forget(self, key: int) -> None:
        self.now -= self._alive.pop(key, 0)

    def _record(self, tensor: Any) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a subclass without storage
            return
        key = storage.data_ptr()
        if key == 0 or key in self._alive:
            return
        self._alive[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._forget, key)

    @contextmanager
    def tracking(self) -> Iterator[LiveBytes]:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    tracker._record(leaf)
                return out

        with _Mode():
            yield self


def _lora(model: Any, layers: list[int] | None) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same LoRA initialisation for every variant
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def _param_bytes(model: Any) -> int:
    from kbitprep.backends.base import model_param_bytes

    return int(model_param_bytes(model))


def keep_numerics(source: Any, prepare: dict[str, Callable[[Any], Any]], batch: Any) -> dict[str, dict[str, Any]]:
    """One LoRA step of each preparation of ``source`` (nf4, bf16 compute) on ``batch``.

    Returns, per variant: ``loss`` (the step-1 loss, a float), ``logits_dtype``, ``lm_head_dtype``
    (how ``lm_head`` stores its weight) and ``upcast_bytes`` (parameter bytes after prepare
    minus before)."""
    out: dict[str, dict[str, Any]] = {}
    for name, fn in prepare.items():
        model = copy.deepcopy(source)
        before = _param_bytes(model)
        fn(model)
        after = _param_bytes(model)
        head = str(model.get_output_embeddings().weight.dtype)
        peft_model = _lora(model, None)
        result = peft_model(input_ids=batch, labels=batch)
        result.loss.backward()
        out[name] = {
            "loss": float(result.loss.detach()),
            "logits_dtype": str(result.logits.dtype),
            "lm_head_dtype": head,
            "upcast_bytes": after - before,
        }
        del peft_model, model, result
    return out


def saved_bytes(
    source: Any, layouts: dict[str, Callable[[Any], Any]], positions: dict[str, int], batch: Any
) -> dict[str, dict[str, int]]:
    """Live tensor bytes a training forward leaves for the backward, per adapter position and
    layout; the backward runs afterwards, so every variant is a real step (its gradients are not
    kept). Returns ``{position: {layout: bytes}}``."""
    result: dict[str, dict[str, int]] = {}
    for where, layer in positions.items():
        result[where] = {}
        for name, prepare in layouts.items():
            model = copy.deepcopy(source)
            prepare(model)
            peft_model = _lora(model, [layer])
            tracker = LiveBytes()
            with tracker.tracking():
                before = tracker.now
                loss = peft_model(input_ids=batch, labels=batch).loss
                held = tracker.now - before
                loss.backward()
            result[where][name] = held
            del peft_model, model, loss
    return result
