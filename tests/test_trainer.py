"""kbitprep inside transformers' Trainer (issue 8), on the tiny Llama loaded with bnb 4-bit nf4.

Each training test runs 3 CPU steps with ``TrainingArguments(gradient_checkpointing=True)`` and
asserts: finite losses, every LoRA tensor changed, one input-grad hook on the embeddings,
checkpointing set up once (``_activation_checkpointing_enable`` counted), and ``use_cache`` off in
every training forward. The recipes are written up in docs/trainer.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, assert_every_lora_changed, lora_params
from _models import load, saved_tiny, tiny_llama
from _quantized import bnb4_config
from _training import (
    TokenDataset,
    UseCacheProbe,
    count_real_enables,
    finite_losses,
    input_grad_hooks,
    training_args,
    watch,
)
from kbitprep import KbitPrepWarning, NotTrainableError
from kbitprep.steps.checkpoint_transformers import current_use_reentrant, is_enabled

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.fixture
def nf4_model(model_root: str) -> nn.Module:
    return load(saved_tiny(model_root), quantization_config=bnb4_config())


def _train(peft_model: nn.Module, args: Any) -> Any:
    from transformers import Trainer

    trainer = Trainer(model=peft_model, args=args, train_dataset=TokenDataset())
    trainer.train()
    return trainer


# -- the recipe: prepare -> get_peft_model -> Trainer(gradient_checkpointing=True) -----------


@pytest.mark.parametrize(
    ("prepare_kwargs", "trainer_kwargs", "reentrant"),
    [
        (None, None, False),
        ({"use_reentrant": True}, None, True),
        ({"use_reentrant": True}, {"use_reentrant": True}, True),
    ],
    ids=["defaults", "reentrant-trainer-silent", "reentrant-both"],
)
def test_trainer_after_prepare(
    nf4_model: nn.Module,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare_kwargs: dict[str, bool] | None,
    trainer_kwargs: dict[str, bool] | None,
    reentrant: bool,
) -> None:
    model = nf4_model
    real = count_real_enables(monkeypatch)
    report = kbitprep.prepare(model, gradient_checkpointing_kwargs=prepare_kwargs)
    assert report.gradient_checkpointing is True
    assert report.use_reentrant is reentrant
    assert real.count == 1
    # transformers 5.24's activation_checkpointing_enable adds one for a model whose main input is
    # input_ids; kbitprep keeps it (C18) and adds none of its own beside it
    assert input_grad_hooks(model) == 1

    peft_model = add_lora(model)
    requests = watch(monkeypatch, model, "activation_checkpointing_enable")
    probe = UseCacheProbe(model)
    before = lora_params(peft_model)

    trainer = _train(peft_model, training_args(tmp_path, gradient_checkpointing_kwargs=trainer_kwargs))

    finite_losses(trainer)
    assert_every_lora_changed(peft_model, before)
    assert requests.count == 1  # the Trainer asked once, at the start of train()
    assert real.count == 1  # and checkpointing was set up once: by kbitprep
    assert input_grad_hooks(model) == 1  # never a second one
    assert current_use_reentrant(model) is reentrant
    probe.assert_cache_off()
    probe.close()


def test_trainer_without_kbitprep_guard_would_double_the_hook(
    nf4_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pin the upstream behaviour the guard exists for: with kbitprep's guards removed, the
    Trainer's enable call sets checkpointing up a second time and adds a second hook."""
    model = nf4_model
    real = count_real_enables(monkeypatch)
    kbitprep.prepare(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert input_grad_hooks(model) == 1
    del model.activation_checkpointing_enable, model.enable_input_require_grads
    _train(add_lora(model), training_args(tmp_path))
    assert real.count == 2
    assert input_grad_hooks(model) == 2


# -- conflicting gradient_checkpointing_kwargs ------------------------------------------------


@pytest.mark.parametrize(
    ("prepared", "asked"), [(True, False), (False, True)], ids=["reentrant-then-not", "not-then-reentrant"]
)
def test_conflicting_checkpointing_kwargs_warn_with_both_values(
    nf4_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepared: bool, asked: bool
) -> None:
    model = nf4_model
    real = count_real_enables(monkeypatch)
    kbitprep.prepare(model, gradient_checkpointing_kwargs={"use_reentrant": prepared})
    peft_model = add_lora(model)
    before = lora_params(peft_model)
    args = training_args(tmp_path, gradient_checkpointing_kwargs={"use_reentrant": asked})

    with pytest.warns(KbitPrepWarning) as caught:
        trainer = _train(peft_model, args)

    ours = [w for w in caught if issubclass(w.category, KbitPrepWarning)]
    assert len(ours) == 1 and ours[0].category is kbitprep.CheckpointingWarning
    message = str(ours[0].message)
    assert re.search(re.escape(f"gradient_checkpointing_kwargs={{'use_reentrant': {prepared}}}"), message)
    assert re.search(re.escape(f"asks for {{'use_reentrant': {asked}}}"), message)
    assert "kbitprep.prepare" in message
    # the later, explicit request is applied (as transformers would), with one hook kept
    assert current_use_reentrant(model) is asked
    assert real.count == 2
    assert input_grad_hooks(model) == 1
    finite_losses(trainer)
    assert_every_lora_changed(peft_model, before)


# -- the guards themselves (no training) ------------------------------------------------------


def test_guards_absorb_repeat_calls_and_undo_removes_them(
    nf4_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nf4_model
    real = count_real_enables(monkeypatch)
    report = kbitprep.prepare(model)
    assert "activation_checkpointing_enable" in vars(model)
    assert "enable_input_require_grads" in vars(model)

    assert input_grad_hooks(model) == 1  # transformers 5's own enable installed it; kept (C18)

    model.activation_checkpointing_enable()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.gradient_checkpointing_enable()  # the deprecated alias TRL's helpers still call
    assert real.count == 1
    assert input_grad_hooks(model) == 1

    model.enable_input_require_grads()  # asked for explicitly: the one there is enough
    model.enable_input_require_grads()
    assert input_grad_hooks(model) == 1

    # a second prepare asking for reentrant goes through (kbitprep's own call) without a warning
    kbitprep.prepare(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert real.count == 2
    assert current_use_reentrant(model) is True
    assert input_grad_hooks(model) == 1

    peft_model = add_lora(model)
    peft_model.enable_input_require_grads()  # what SFTTrainer calls, through PeftModel
    peft_model.activation_checkpointing_enable()  # what Trainer calls, through PeftModel
    assert real.count == 2
    assert input_grad_hooks(model) == 1

    report.undo()
    assert "activation_checkpointing_enable" not in vars(model)
    assert "enable_input_require_grads" not in vars(model)
    assert "_kbitprep_checkpointing_guard" not in vars(model)


def test_undo_after_single_prepare_restores_plain_model(nf4_model: nn.Module) -> None:
    model = nf4_model
    report = kbitprep.prepare(model)
    report.undo()
    assert not is_enabled(model)
    assert input_grad_hooks(model) == 0
    assert not any(k in vars(model) for k in ("activation_checkpointing_enable", "enable_input_require_grads"))
    assert model.config.use_cache is True


def test_layer_choices_pass_through_without_warning(nf4_model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nf4_model
    real = count_real_enables(monkeypatch)
    kbitprep.prepare(model)
    model.activation_checkpointing_enable(every_n_layers=2)  # not a kwargs conflict: applied
    assert real.count == 2
    assert current_use_reentrant(model) is False
    assert input_grad_hooks(model) == 1  # transformers' own enable asks for input grads; added once


# -- torchao IntxWeightOnly int4: transformers says not trainable, LoRA trains ---------------


def test_torchao_int4_trainer_needs_mark_trainable(
    model_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig, Trainer

    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    model = load(saved_tiny(model_root), quantization_config=config)
    quantizer = model.hf_quantizer
    original_class = type(quantizer)
    assert quantizer.is_trainable is False

    real = count_real_enables(monkeypatch)
    with pytest.warns(kbitprep.BackendWarning, match=re.escape("kbitprep.mark_trainable(model)")):
        kbitprep.prepare(model)
    peft_model = add_lora(model)
    args = training_args(tmp_path)

    # what a Trainer user meets without the opt-in
    with pytest.raises(ValueError, match="do not support training"):
        Trainer(model=peft_model, args=args, train_dataset=TokenDataset())

    before = lora_params(peft_model)
    with kbitprep.mark_trainable(peft_model) as override:
        assert override.active
        assert model.hf_quantizer is quantizer
        assert quantizer.is_trainable is True
        assert isinstance(quantizer, original_class)
        trainer = _train(peft_model, args)

    assert type(quantizer) is original_class
    assert quantizer.is_trainable is False
    finite_losses(trainer)
    assert_every_lora_changed(peft_model, before)
    assert real.count == 1
    assert input_grad_hooks(model) == 1  # transformers 5's enable installed it; kept (C18)


class _Quantizer:
    def __init__(self, trainable: bool) -> None:
        self._trainable = trainable

    @property
    def is_trainable(self) -> bool:
        return self._trainable


def test_mark_trainable_refuses_when_the_strategy_does() -> None:
    model = tiny_llama()
    model.is_quantized = True
    model.quantization_method = "vptq"  # generic backend (no vptq strategy): defers to transformers' flag
    model.model.layers[0].mlp.register_buffer("codes", torch.zeros(64, 8, dtype=torch.int8))  # its storage
    model.hf_quantizer = quantizer = _Quantizer(False)
    with pytest.raises(NotTrainableError):
        kbitprep.mark_trainable(model)
    assert type(quantizer) is _Quantizer
    assert quantizer.is_trainable is False


def test_mark_trainable_is_a_no_op_when_nothing_needs_it() -> None:
    model = tiny_llama()
    override = kbitprep.mark_trainable(model)
    assert override.active is False and override.quantizer is None
    override.undo()

    model.hf_quantizer = quantizer = _Quantizer(True)
    override = kbitprep.mark_trainable(model)
    assert override.active is False
    assert type(quantizer) is _Quantizer


# -- two processes: torch.distributed.run (what `accelerate launch` runs) ---------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_two_process_launch(model_root: str, tmp_path: Path) -> None:
    """The recipe above, launched as 2 CPU ranks. accelerate 1.15 turns FSDP on only for GPU-like
    distributed types, so on CPU the Trainer runs DDP over gloo (``DistributedType.MULTI_CPU``)."""
    import json
    import os
    import subprocess
    import sys

    path = saved_tiny(model_root)
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tests / "_trainer_launch.py"),
        path,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:
        assert res["world_size"] == 2
        assert res["distributed_type"].endswith("MULTI_CPU")
        assert res["finite"] and len(res["losses"]) == 3
        assert res["lora"] == 8 and res["lora_changed"] == 8
        assert res["real_enables"] == 1  # kbitprep's; the Trainer's call on each rank changed nothing
        assert res["input_grad_hooks"] == 1  # transformers 5's, kept (C18); none added by the Trainer
        assert res["use_cache"] is False
    assert ranks[0]["lora_checksum"] == ranks[1]["lora_checksum"]  # DDP kept the replicas equal
