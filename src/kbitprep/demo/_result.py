"""The demo's settings, what it measured, and how it tells its user (:class:`Reporter`)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kbitprep._plan import PreparationPlan
    from kbitprep._registry import Detection

__all__ = ["SUMMARY_KEYS", "DemoOptions", "DemoResult", "LogReporter", "Reporter"]

logger = logging.getLogger(__name__)

# The JSON summary's keys, in order
SUMMARY_KEYS = (
    "model",
    "quantization",
    "backend",
    "steps",
    "loss_before",
    "loss_after",
    "train_losses",
    "lora_params",
    "lora_params_with_grad",
    "bytes_before",
    "bytes_after",
    "peak_rss_bytes",
    "predicted_peak_bytes",
    "measured_peak_bytes",
    "seconds",
)


class Reporter(Protocol):
    """What the demo tells its user; ``kbitprep.cli`` implements it with rich."""

    def message(self, text: str) -> None: ...

    def detected(self, detection: Detection) -> None: ...

    def planned(self, p: PreparationPlan, bytes_before: int) -> None: ...

    def trainable(self, lora_tensors: int, trainable: int, total: int) -> None: ...

    def training(self, steps: int) -> contextlib.AbstractContextManager[Callable[[int, float], None]]: ...

    def losses(self, before: float, after: float | None) -> None: ...


class LogReporter:
    """A :class:`Reporter` that logs (used when no other reporter is given)."""

    def message(self, text: str) -> None:
        logger.info("%s", text)

    def detected(self, detection: Detection) -> None:
        logger.info("backend %s: %s", detection.backend, detection.reason)

    def planned(self, p: PreparationPlan, bytes_before: int) -> None:
        logger.info("plan:\n%s", p)

    def trainable(self, lora_tensors: int, trainable: int, total: int) -> None:
        logger.info("trainable parameters: %d of %d (%d LoRA tensors)", trainable, total, lora_tensors)

    @contextlib.contextmanager
    def training(self, steps: int) -> Iterator[Callable[[int, float], None]]:
        yield lambda step, loss: logger.info("step %d/%d loss %.4f", step, steps, loss)

    def losses(self, before: float, after: float | None) -> None:
        logger.info("held-out loss before %.4f, after %s", before, after)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's settings; the defaults are the CLI's.

    The defaults (4 sequences × 128 tokens a step, lr 2e-3, 30 steps, LoRA r=8 on peft's default
    targets) keep the nf4 run on SmolLM2-135M well under 5 minutes on 2 idle CPU cores (about
    3 s a step): a step costs a forward, a checkpointing recompute and a backward through 30
    dequantized 4-bit layers.
    """

    model: str | None = None
    quantization: str = "nf4"
    steps: int = 30
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 2e-3
    keep_in_low_precision: tuple[str, ...] = ()
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str | tuple[str, ...] | None = (
        None  # None: peft's default for the architecture (q_proj, v_proj for Llama)
    )


@dataclass(slots=True)
class DemoResult:
    """What the demo measured. :meth:`summary` is the ``--json`` document.

    ``predicted_peak_bytes`` is :func:`kbitprep.estimate`'s peak of live tensor bytes over one
    training step of this run (same model, quantization, prepare options, LoRA, batch, AdamW, on
    the CPU), made before training; ``measured_peak_bytes`` is the same quantity measured on the
    run's second training step (``kbitprep._estimate.measure_step``; the first creates the
    optimizer states). Either is None when it was not made; the ``*_note`` field says why, and
    the ``*_at`` field names the phase of the step the peak was reached in.
    """

    model: str
    quantization: str
    backend: str = ""
    steps: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    train_losses: list[float] = field(default_factory=list)
    lora_params: int = 0
    lora_params_with_grad: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    peak_rss_bytes: int = 0
    predicted_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    seconds: float = 0.0
    predicted_peak_at: str = ""
    predicted_peak_note: str = ""
    measured_peak_at: str = ""
    measured_peak_note: str = ""

    def summary(self) -> dict[str, Any]:
        """The JSON summary, with exactly the keys of ``SUMMARY_KEYS``, in that order.
        Non-finite losses are written as null, so the file stays valid JSON."""

        def clean(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        out = {k: getattr(self, k) for k in SUMMARY_KEYS}
        out["loss_before"] = clean(self.loss_before)
        out["loss_after"] = clean(self.loss_after)
        out["train_losses"] = [clean(x) for x in self.train_losses]
        return out
