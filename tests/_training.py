"""Trainer / SFTTrainer helpers: call counters, the use_cache probe, the token dataset and the
TrainingArguments every trainer test shares."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _models import standard_batch

STEPS = 3


class Calls:
    """Wrap a callable and count the calls that go through it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.calls)


def count_real_enables(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Count the times checkpointing is really set up on any Llama model.

    ``PreTrainedModel._activation_checkpointing_enable`` (transformers 5.24) is where the
    checkpoint function is installed on every layer and ``enable_input_require_grads`` is called;
    every public enable path (``activation_checkpointing_enable``, the deprecated
    ``gradient_checkpointing_enable``, Trainer, TRL) ends there.
    """
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM._activation_checkpointing_enable
    counter = Calls(original)

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return counter(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "_activation_checkpointing_enable", counted)
    return counter


def watch(monkeypatch: pytest.MonkeyPatch, model: nn.Module, name: str) -> Calls:
    """Count the calls a trainer makes to ``model.<name>`` (after kbitprep installed its guard)."""
    counter = Calls(getattr(model, name))
    monkeypatch.setattr(model, name, counter)
    return counter


def input_grad_hooks(model: nn.Module) -> int:
    """Forward hooks on the input embeddings (the only hooks there are input-grad hooks)."""
    return len(model.get_input_embeddings()._forward_hooks)


class UseCacheProbe:
    """Record, for each training forward of ``model``, ``config.use_cache``, the ``use_cache``
    argument and whether a KV cache came back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: list[tuple[bool | None, Any, bool]] = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if module.training:
            cache = getattr(output, "past_key_values", None)
            self.seen.append((module.config.use_cache, kwargs.get("use_cache"), cache is not None))

    def close(self) -> None:
        self.handle.remove()

    def assert_cache_off(self, steps: int = STEPS) -> None:
        assert len(self.seen) >= steps, self.seen
        for config_flag, argument, returned in self.seen:
            assert config_flag is False
            assert argument is not True
            assert returned is False


def finite_losses(trainer: Any, steps: int = STEPS) -> list[float]:
    values = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert len(values) == steps, trainer.state.log_history
    assert all(math.isfinite(v) for v in values), values
    return values


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """8 rows of 32 random token ids (the standard batch's generator), labels = inputs."""

    def __init__(self, rows: int = 8, seq: int = 32) -> None:
        self.ids = torch.cat([standard_batch(batch=2, seq=seq)] * (rows // 2))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def common_args(tmp_path: Path) -> dict[str, Any]:
    """TrainingArguments / SFTConfig keywords every test shares: 3 CPU steps, nothing saved."""
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def training_args(tmp_path: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(**{**common_args(tmp_path), "gradient_checkpointing": True, **overrides})
