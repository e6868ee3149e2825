"""The demo's run: load, quantize, plan, prepare with kbitprep, attach LoRA, predict the peak
memory of a training step, train (measuring that peak on the second step), measure; and
``kbitprep inspect``'s dry run.

Everything here is plain library code: it logs and reports through a
:class:`~kbitprep.demo.Reporter` and never prints; ``kbitprep.cli`` draws the tables and the
progress bar. peft is imported inside the function that attaches LoRA.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError
from kbitprep._plan import PreparationPlan
from kbitprep._prepare import plan, prepare
from kbitprep._registry import Detection, detect_backend
from kbitprep.demo import _model
from kbitprep.demo._data import corpus, held_out_blocks, tokenize, train_windows
from kbitprep.demo._errors import DemoSetupError, TrainingCheckError
from kbitprep.demo._measure import lora_gradient_check, mean_loss, param_bytes, peak_rss_bytes
from kbitprep.demo._result import DemoOptions, DemoResult, LogReporter, Reporter

__all__ = ["inspect_model", "run_demo"]

logger = logging.getLogger(__name__)

# The training step whose peak of live tensors is measured: the second, the first one that starts
# with the optimizer states in place (the first step creates them), as the estimate predicts.
MEASURED_STEP = 2
# kbitprep.estimate's name of the demo's optimizer, by its type
_OPTIMIZER_NAMES: dict[type[torch.optim.Optimizer], str] = {torch.optim.AdamW: "adamw", torch.optim.SGD: "sgd"}


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


def _prepare_options(options: DemoOptions) -> dict[str, Any]:
    """The options of ``plan`` / ``prepare`` the demo uses, also given to the estimate."""
    return {"use_gradient_checkpointing": True, "keep_in_low_precision": tuple(options.keep_in_low_precision)}


def _load_and_prepare(run: _Run, model_dir: Path, held: torch.Tensor) -> tuple[nn.Module, float]:
    """Load and quantize, show the detection and the plan, measure the loss before, prepare.
    Returns the prepared model and the held-out loss before."""
    options, result = run.options, run.result
    run.rep.message(f"Loading {result.model} ({options.quantization}) from {model_dir} ...")
    model = _model.load_model(model_dir, options.quantization)
    detection = detect_backend(model)
    result.backend = detection.backend
    run.rep.detected(detection)
    prepare_options = _prepare_options(options)
    result.bytes_before = param_bytes(model)
    run.rep.planned(plan(model, **prepare_options), result.bytes_before)

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
    prepare(model, **prepare_options)
    result.bytes_after = param_bytes(model)
    return model, before


def _attach_lora(run: _Run, model: nn.Module) -> tuple[Any, Any, list[str]]:
    """peft's LoRA on ``model``; returns the peft model, the LoRA config and the names of its
    trainable LoRA tensors."""
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
    return peft_model, lora, names


def _first_sentence(text: str) -> str:
    return text.split(". ", 1)[0].rstrip(".")


def _predict_peak(run: _Run, model: nn.Module, lora: Any, optimizer: torch.optim.Optimizer) -> None:
    """:func:`kbitprep.estimate` of one training step of this run, before training: the same
    model (rebuilt on the meta device from its config, with its quantization config), prepare
    options, LoRA config, batch shape and optimizer, for the CPU. A quantization the estimate
    does not model leaves the prediction out, with the reason; so does any other failure of the
    estimate (a model it cannot trace, a graph the training checks will reject), which must not
    stop the run."""
    from kbitprep._estimate import estimate, format_bytes

    options, result = run.options, run.result
    name = _OPTIMIZER_NAMES.get(type(optimizer))
    if name is None:  # pragma: no cover - the demo's optimizer is AdamW
        result.predicted_peak_note = f"kbitprep.estimate does not model {type(optimizer).__name__}"
    else:
        try:
            # the estimate builds and traces a meta copy; fork the RNG so training sees the same draws
            with torch.random.fork_rng(devices=[]):
                est = estimate(
                    model,
                    batch_size=options.batch_size,
                    seq_len=options.seq_len,
                    adapter=lora,
                    optimizer=name,
                    device="cpu",
                    **_prepare_options(options),
                )
        except InvalidArgumentError as exc:  # e.g. a quantization method the estimate does not model
            result.predicted_peak_note = _first_sentence(str(exc))
        except Exception as exc:  # the prediction is a side show: it must not stop the training run
            logger.debug("kbitprep.estimate failed", exc_info=True)
            first_line = (str(exc).strip().splitlines() or [""])[0]
            result.predicted_peak_note = f"kbitprep.estimate failed: {type(exc).__name__}: {first_line}"
        else:
            result.predicted_peak_bytes, result.predicted_peak_at = int(est.peak_bytes), est.peak_at
    if result.predicted_peak_bytes is None:
        run.rep.message(f"Peak of live tensors over a training step: not predicted ({result.predicted_peak_note})")
        return
    run.rep.message(
        f"Predicted peak of live tensors over a training step: {format_bytes(result.predicted_peak_bytes)} "
        f"(in the {result.predicted_peak_at})"
    )


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


def _record_loss(run: _Run, loss: torch.Tensor, step: int, names: list[str]) -> float:
    """Record step ``step``'s training loss; raise when it cannot train or is not finite."""
    value = float(loss.detach())
    run.result.train_losses.append(value)
    run.result.steps = step
    if not loss.requires_grad:  # the graph is cut before every LoRA parameter
        raise run.fail(
            f"All {len(names)} LoRA parameters got no gradient at the first step: the loss "
            "does not depend on any of them (the base model cut the autograd graph). Nothing was trained."
        )
    if not math.isfinite(value):
        raise run.fail(f"The training loss at step {step} is {value}; stopping. Try a smaller --lr.")
    return value


def _measured_step(
    run: _Run, model: nn.Module, batch: torch.Tensor, optimizer: torch.optim.Optimizer, names: list[str]
) -> float:
    """Training step :data:`MEASURED_STEP`, the same step as the others (forward with labels,
    backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``), run by
    ``kbitprep._estimate.measure_step``, which tracks the live tensor storages (it only observes:
    the step computes what an untracked one does). A forward hook records the loss. Returns it."""
    from kbitprep._estimate import measure_step

    losses: list[float] = []

    def on_output(_module: nn.Module, _args: Any, output: Any) -> None:
        losses.append(_record_loss(run, output.loss, MEASURED_STEP, names))

    handle = model.register_forward_hook(on_output)
    try:
        tracker = measure_step(model, {"input_ids": batch, "labels": batch}, optimizer)
    finally:
        handle.remove()
    run.result.measured_peak_bytes, run.result.measured_peak_at = int(tracker.peak), tracker.peak_at
    return losses[0]


def _train(
    run: _Run, model: nn.Module, names: list[str], train_ids: torch.Tensor, optimizer: torch.optim.Optimizer
) -> None:
    """The training loop: one optimizer step per batch, the gradient check after the first
    backward, the peak of live tensors measured over step :data:`MEASURED_STEP`."""
    options = run.options
    generator = torch.Generator().manual_seed(options.seed)
    if options.steps < MEASURED_STEP:
        run.result.measured_peak_note = (
            f"the peak is measured over step {MEASURED_STEP}; pass --steps {MEASURED_STEP} or more"
        )
    model.train()
    with run.rep.training(options.steps) as advance:
        for step in range(1, options.steps + 1):
            batch = train_windows(train_ids, options.seq_len, options.batch_size, generator)
            if step == MEASURED_STEP:
                advance(step, _measured_step(run, model, batch, optimizer, names))
                continue
            loss = model(input_ids=batch, labels=batch).loss
            value = _record_loss(run, loss, step, names)
            loss.backward()
            if step == 1:
                _check_first_step(run, model, names)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            advance(step, value)


def run_demo(options: DemoOptions, reporter: Reporter | None = None) -> DemoResult:
    """Load, quantize, plan, prepare with kbitprep, attach LoRA, predict the peak of live tensors
    over a training step (:func:`kbitprep.estimate`), train (measuring that peak over the second
    step), and measure.

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
    model, lora, names = _attach_lora(run, prepared)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    _predict_peak(run, model, lora, optimizer)
    _train(run, model, names, train_ids, optimizer)

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
