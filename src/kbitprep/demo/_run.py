"""The demo's run: load, quantize, plan, prepare with kbitprep, attach LoRA, train, measure;
and ``kbitprep inspect``'s dry run.

Everything here is plain library code: it logs and reports through a
:class:`~kbitprep.demo.Reporter` and never prints; ``kbitprep.cli`` draws the tables and the
progress bar. peft is imported inside the function that attaches LoRA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitprep._prepare import PreparationPlan, plan, prepare
from kbitprep._registry import Detection, detect_backend
from kbitprep.demo import _model
from kbitprep.demo._data import corpus, held_out_blocks, tokenize, train_windows
from kbitprep.demo._errors import DemoSetupError, TrainingCheckError
from kbitprep.demo._measure import lora_gradient_check, mean_loss, param_bytes, peak_rss_bytes
from kbitprep.demo._result import DemoOptions, DemoResult, LogReporter, Reporter

__all__ = ["inspect_model", "run_demo"]


@dataclass(slots=True)
class _Run:
    """One demo run in progress: its settings, its reporter, what it measured so far."""

    options: DemoOptions
    rep: Reporter
    result: DemoResult
    start: float

    def finish(self) -> None:
        self.result.seconds = round(time.perf_counter() - self.start, 2)
        self.result.peak_rss_bytes = peak_rss_bytes()

    def fail(self, message: str) -> TrainingCheckError:
        self.finish()
        return TrainingCheckError(message, self.result)


def _check_options(options: DemoOptions) -> None:
    if options.steps < 1 or options.seq_len < 2 or options.batch_size < 1 or not options.lr > 0:
        raise DemoSetupError("--steps and --batch-size must be at least 1, --seq-len at least 2, and --lr positive.")


def _load_corpus(model_dir: Path, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training token ids and the held-out blocks, tokenized with the model's tokenizer."""
    tokenizer = _model.load_tokenizer(model_dir)
    train_text, held_text = corpus()
    train_ids, held_ids = tokenize(tokenizer, train_text), tokenize(tokenizer, held_text)
    if train_ids.numel() < seq_len:
        raise DemoSetupError(
            f"The training corpus is {train_ids.numel()} tokens long with this tokenizer, shorter than "
            f"--seq-len {seq_len}. Pass a smaller --seq-len."
        )
    return train_ids, held_out_blocks(held_ids, seq_len)


def _load_and_prepare(run: _Run, model_dir: Path, held: torch.Tensor) -> tuple[nn.Module, float]:
    """Load and quantize, show the detection and the plan, measure the loss before, prepare.
    Returns the prepared model and the held-out loss before."""
    options, result = run.options, run.result
    run.rep.message(f"Loading {result.model} ({options.quantization}) from {model_dir} ...")
    model = _model.load_model(model_dir, options.quantization)
    detection = detect_backend(model)
    result.backend = detection.backend
    run.rep.detected(detection)
    keep = tuple(options.keep_in_low_precision)
    result.bytes_before = param_bytes(model)
    run.rep.planned(plan(model, keep_in_low_precision=keep), result.bytes_before)

    # The "loss before" is an inference call (eval mode, no grad) on the quantized model before
    # prepare, the order a user runs. On a CPU with AVX512-BF16 it makes bitsandbytes repack its
    # 4-bit weights into an inference-only layout; prepare must undo that,
    # and the gradient check after the first step proves it did.
    before = result.loss_before = mean_loss(model, held, options.batch_size)
    if not math.isfinite(before):
        raise run.fail(
            f"The held-out loss before training is {before}: the model produces non-finite "
            "logits before kbitprep touched it. Check the checkpoint's weights."
        )
    prepare(model, keep_in_low_precision=keep)
    result.bytes_after = param_bytes(model)
    return model, before


def _attach_lora(run: _Run, model: nn.Module) -> tuple[Any, list[str]]:
    """peft's LoRA on ``model``; returns the peft model and the names of its trainable LoRA tensors."""
    from peft import LoraConfig, get_peft_model

    options = run.options
    torch.manual_seed(options.seed)
    targets = options.lora_targets
    lora = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets if targets is None or isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    trainable, total = peft_model.get_nb_trainable_parameters()
    names = [n for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad]
    run.result.lora_params = len(names)
    run.rep.trainable(len(names), int(trainable), int(total))
    return peft_model, names


def _check_first_step(run: _Run, model: nn.Module, names: list[str]) -> None:
    """Raise when a LoRA parameter got no gradient in the first backward pass."""
    _names, with_grad = lora_gradient_check(model)
    run.result.lora_params_with_grad = len(with_grad)
    if len(with_grad) < len(names):
        dead = [n for n in names if n not in set(with_grad)]
        raise run.fail(
            f"{len(dead)} of {len(names)} LoRA parameters got no gradient at the first step "
            f"(first: {dead[0]}). The base model cut the autograd graph, so training would silently "
            "change nothing; for example, bitsandbytes' CPU kernel repacks the 4-bit weights for "
            "inference after an eval-mode forward, and the repacked weights pass no gradient back. "
            "Nothing was trained."
        )


def _train(run: _Run, model: nn.Module, names: list[str], train_ids: torch.Tensor) -> None:
    """The training loop: one optimizer step per batch, the gradient check after the first."""
    options, result = run.options, run.result
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    model.train()
    with run.rep.training(options.steps) as advance:
        for step in range(1, options.steps + 1):
            batch = train_windows(train_ids, options.seq_len, options.batch_size, generator)
            loss = model(input_ids=batch, labels=batch).loss
            value = float(loss.detach())
            result.train_losses.append(value)
            result.steps = step
            if not loss.requires_grad:  # the graph is cut before every LoRA parameter
                raise run.fail(
                    f"All {len(names)} LoRA parameters got no gradient at the first step: the loss "
                    "does not depend on any of them (the base model cut the autograd graph). Nothing was trained."
                )
            loss.backward()
            if not math.isfinite(value):
                raise run.fail(f"The training loss at step {step} is {value}; stopping. Try a smaller --lr.")
            if step == 1:
                _check_first_step(run, model, names)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            advance(step, value)


def run_demo(options: DemoOptions, reporter: Reporter | None = None) -> DemoResult:
    """Load, quantize, plan, prepare with kbitprep, attach LoRA, train, and measure.

    The order is the one a user runs: the held-out loss *before* is an eval-mode, no-grad
    forward of the quantized model, which on a CPU with AVX512-BF16 repacks bitsandbytes 4-bit
    weights into an inference-only layout; ``prepare`` must undo that, and the gradient check
    after the first step proves it did.

    Returns:
        The measurements.

    Raises:
        DemoSetupError: The model or tokenizer cannot be loaded, or the corpus is too short for
            ``seq_len``.
        TrainingCheckError: A LoRA parameter got no gradient at the first step, or a loss is not
            finite. ``.result`` holds what was measured.
        kbitprep.NotTrainableError: The backend refuses to prepare the model.
    """
    rep: Reporter = reporter if reporter is not None else LogReporter()
    start = time.perf_counter()
    _check_options(options)
    model_dir = Path(options.model) if options.model else _model.default_model_dir(rep.message)
    result = DemoResult(model=str(options.model or _model.DEFAULT_MODEL), quantization=options.quantization)
    run = _Run(options, rep, result, start)

    train_ids, held = _load_corpus(model_dir, options.seq_len)
    prepared, before = _load_and_prepare(run, model_dir, held)
    model, names = _attach_lora(run, prepared)
    _train(run, model, names, train_ids)

    after = result.loss_after = mean_loss(model, held, options.batch_size)
    rep.losses(before, after)
    run.finish()
    if not math.isfinite(after):
        raise run.fail(f"The held-out loss after training is {after}. Try a smaller --lr.")
    return result


def inspect_model(
    path: str | Path, quantization: str, keep_in_low_precision: Sequence[str] = ()
) -> tuple[Detection, PreparationPlan, int]:
    """Load the model at ``path``; return its detection, its plan and its parameter bytes.

    Only the model is loaded (no tokenizer, no corpus), and :func:`kbitprep.plan` changes nothing.
    """
    model = _model.load_model(path, quantization)
    detection = detect_backend(model)
    return detection, plan(model, keep_in_low_precision=tuple(keep_in_low_precision)), param_bytes(model)
