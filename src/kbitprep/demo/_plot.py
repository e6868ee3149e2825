"""The demo's loss curve as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kbitprep.demo._result import DemoResult

__all__ = ["save_loss_plot"]


def save_loss_plot(result: DemoResult, path: str | Path) -> None:
    """Write the training loss per step and the held-out losses before/after as a PNG (matplotlib,
    without pyplot, so no global backend is chosen)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = list(range(1, len(result.train_losses) + 1))
    ax.plot(steps, result.train_losses, marker=".", label="training loss (batch)")
    if result.loss_before is not None:
        ax.axhline(
            result.loss_before, color="tab:red", linestyle="--", label=f"held-out before {result.loss_before:.3f}"
        )
    if result.loss_after is not None:
        ax.axhline(
            result.loss_after, color="tab:green", linestyle="--", label=f"held-out after {result.loss_after:.3f}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"kbitprep demo: {result.model}, {result.quantization} ({result.backend})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path), format="png")
