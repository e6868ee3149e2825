"""``MemoryEstimate``: the predicted peak of one training step and its parts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

__all__ = ["MemoryEstimate", "format_bytes"]


def format_bytes(n: int | float) -> str:
    """``n`` bytes in binary units, e.g. ``"5.62 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.2f} {unit}"
        value /= 1024
    return f"{value:,.2f} GiB"  # pragma: no cover


_PARTS = (
    ("quantized_bytes", "quantized storage (packed weights, quantization state)"),
    ("weight_bytes", "other weights after the plan's casts (and buffers)"),
    ("adapter_bytes", "adapter parameters"),
    ("gradient_bytes", "adapter gradients"),
    ("optimizer_bytes", "optimizer states"),
    ("activation_bytes", "saved activations at the end of the forward"),
    ("recompute_bytes", "backward working set of one block (its recompute included)"),
    ("logits_bytes", "logits and loss buffers"),
)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory one training step needs, predicted by :func:`kbitprep.estimate`.

    Every size is in bytes of tensor storage on the training device (what
    ``torch.cuda.max_memory_allocated`` counts): no CUDA context, allocator cache or
    fragmentation.

    Attributes:
        peak_bytes: The most bytes alive at once during a steady-state step (weights, adapters
            and optimizer states included).
        peak_at: Where the peak falls, e.g. ``"backward of the loss"``,
            ``"recompute of block 3 (model.layers.3)"``, ``"optimizer step"``.
        quantized_bytes: Quantized storage: packed 4-bit / int8 weights and their quantization
            state (absmax, nested absmax, code, LLM.int8 row scales).
        weight_bytes: Every other parameter and buffer, in the dtype the preparation plan leaves
            it (e.g. norms and ``lm_head`` upcast to fp32).
        adapter_bytes: Trainable parameters: adapter weights and ``modules_to_save`` copies.
        gradient_bytes: Their gradients (each the size of its parameter).
        optimizer_bytes: Optimizer states (AdamW: two per trainable element in its dtype).
        activation_bytes: Tensors alive at the end of the forward beyond the weights: what
            autograd saved for the backward under the checkpointing layout (only block inputs for
            a checkpointed block, everything for one that is not), plus the loss.
        recompute_bytes: The most one block's backward adds above the level where it starts,
            its recompute included when it is checkpointed.
        logits_bytes: What the output head and the loss add above the saved activations, at
            most: logits, log-softmax output and their gradients (fp32 when upcast).
        live_at_peak: ``peak_bytes`` split by kind: ``"quantized storage"``, ``"other
            weights"``, ``"adapter parameters"``, ``"optimizer states"``, and the storages created
            in the ``"forward"``, the ``"backward"`` (gradients included) and the ``"optimizer
            step"``.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        device: The device type predicted for (``"cuda"`` or ``"cpu"``).
        optimizer: ``"adamw"``, ``"adamw_8bit"`` or ``"sgd"``.
        model: The model class.
        quantization: e.g. ``"bitsandbytes nf4 (compute float32, double quant)"``,
            ``"unquantized"``.
        backend: The kbitprep backend of the plan.
        checkpointing: The checkpointing layout, e.g. ``"every block"``, ``"every 2nd block"``,
            ``"off"``.
        trainable_params: Trainable elements.
        notes: Assumptions taken (MoE routing, values unknown without weights) and the plan's
            warnings.
    """

    peak_bytes: int
    peak_at: str
    quantized_bytes: int
    weight_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    recompute_bytes: int
    logits_bytes: int
    live_at_peak: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    batch_size: int = 0
    seq_len: int = 0
    device: str = "cuda"
    optimizer: str = "adamw"
    model: str = ""
    quantization: str = "unquantized"
    backend: str = "none"
    checkpointing: str = "off"
    trainable_params: int = 0
    notes: tuple[str, ...] = ()

    @property
    def parts(self) -> dict[str, int]:
        """The named parts, in bytes (they overlap in time, so they do not sum to the peak)."""
        return {name: int(getattr(self, name)) for name, _label in _PARTS}

    def to_dict(self) -> dict[str, Any]:
        """The estimate as JSON-serialisable data (sizes in bytes)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def rows(self) -> list[tuple[str, int]]:
        """``(label, bytes)`` for each part, then the peak (what ``__str__`` and the CLI show)."""
        rows = [(label, int(getattr(self, name))) for name, label in _PARTS]
        rows.append((f"peak ({self.peak_at})", self.peak_bytes))
        return rows

    def __str__(self) -> str:
        head = (
            f"{self.model}: {self.quantization}, {self.batch_size} x {self.seq_len} tokens, "
            f"checkpointing {self.checkpointing}, {self.trainable_params:,} trainable, {self.optimizer}, "
            f"on {self.device}"
        )
        rows = self.rows()
        width = max(len(label) for label, _ in rows)
        lines = [head, ""]
        for label, n in rows:
            lines.append(f"{label:<{width}}  {format_bytes(n):>12}  {n:>16,}")
        lines.insert(len(lines) - 1, "-" * (width + 32))
        if self.live_at_peak:
            at_peak = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.live_at_peak.items() if v)
            lines.append(f"at the peak: {at_peak}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
