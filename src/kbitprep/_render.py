"""The one renderer of a plan: :func:`plan_view` turns a plan into tables and lines that
``PreparationPlan.__str__`` prints as text and ``kbitprep inspect`` / ``kbitprep demo`` draw
with rich."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kbitprep._plan import PreparationPlan, set_text_renderer

if TYPE_CHECKING:
    import torch

    from kbitprep._errors import PlanWarning

__all__ = ["PlanView", "Table", "plan_view", "render_text"]


@dataclass(frozen=True, slots=True)
class Table:
    """A titled table of strings; ``numeric`` marks right-aligned columns."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class PlanView:
    """Everything a plan shows, in order: the backend line, the casts, the modules that compute
    in another dtype, then ``(label, value)`` summary rows and the warnings."""

    header: str
    casts: Table
    precision: Table | None
    summary: tuple[tuple[str, str], ...]
    warnings: tuple[PlanWarning, ...]


def _short(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


def _cast_table(p: PreparationPlan, grouped: bool) -> Table:
    groups: dict[tuple[str, str, str, str], list[int]] = {}
    for c in p.casts:
        name = re.sub(r"\.\d+\.", ".*.", c.name) if grouped else c.name
        shape = "x".join(str(s) for s in c.shape) or "()"
        key = (name, "" if grouped else shape, str(c.from_dtype), str(c.to_dtype))
        g = groups.setdefault(key, [0, 0, 0])
        g[0] += 1
        g[1] += c.bytes_before
        g[2] += c.bytes_after
    rows = tuple(
        (name, str(n) if grouped else shape, src, dst, f"{before:,}", f"{after:,}")
        for (name, shape, src, dst), (n, before, after) in groups.items()
    )
    second = "count" if grouped else "shape"
    return Table(
        f"{len(p.casts)} parameter casts",
        ("parameter", second, "from", "to", "bytes before", "bytes after"),
        rows,
        (False, grouped, False, False, True, True),
    )


def _precision_table(p: PreparationPlan) -> Table | None:
    shown = [m for m in p.precision if m.upcast_at_use or m.computes != p.activation_dtype]
    if not shown:
        return None
    rows = tuple(
        (m.name, _short(m.stored), _short(m.computes), "at use" if m.upcast_at_use else "-", _short(m.output_to))
        for m in shown
    )
    rest = len(p.precision) - len(shown)
    return Table(
        f"computes in another dtype than stored or than the activations ({_short(p.activation_dtype)}); "
        f"{rest} more module(s) only cast their inputs",
        ("module", "stored", "computes", "weight brought up", "output cast to"),
        rows,
        (False, False, False, False, False),
    )


def _checkpointing(p: PreparationPlan) -> str:
    if not p.gradient_checkpointing:
        return "off"
    parts = [f"on, use_reentrant={p.use_reentrant}"]
    if p.activation_offload:
        parts.append("activations offloaded to host memory")
    if p.checkpoint_every_n_layers != 1:
        parts.append(f"every {p.checkpoint_every_n_layers} layers")
    if p.checkpointed_blocks is not None:
        done, total = p.checkpointed_blocks
        when = (
            " (from the first block holding trainable parameters; the blocks before it build no graph; "
            "decided at each training forward)"
        )
        selective = p.checkpoint_trainable_blocks_only or p.checkpoint_every_n_layers != 1
        parts.append(f"{done} of {total} blocks now" + (when if selective else ""))
    return "; ".join(parts)


def _percent(part: int, whole: int) -> str:
    share = part / whole
    if 0 < share < 0.01:
        return "<1%"
    if 0.99 < share < 1:
        return ">99%"
    return f"{share:.0%}"


def _quantized_share(storage: int, floating: int) -> str:
    """The quantized share of the base parameter bytes, and what stays in floating point."""
    whole = storage + floating
    return (
        f"{storage:,} bytes ({_percent(storage, whole)} of parameter bytes); "
        f"not quantized: {floating:,} bytes ({_percent(floating, whole)})"
    )


def _summary(p: PreparationPlan) -> tuple[tuple[str, str], ...]:
    rows = [
        ("bytes delta", f"{p.bytes_delta:+,}"),
        ("compute dtype", f"{_short(p.compute_dtype)}; activations {_short(p.activation_dtype)}"),
        ("frozen parameters", f"{p.frozen}; adapters kept trainable: {len(p.kept_trainable)}"),
        ("gradient checkpointing", _checkpointing(p)),
        ("input-grad hook", "yes" if p.input_grad_hook else "no"),
    ]
    if p.storage_bytes:
        rows.append(("quantized storage", _quantized_share(p.storage_bytes, p.float_bytes)))
    for item in (i for i in p.model_inputs if i.name != "inputs_embeds"):
        how = "cast by kbitprep" if item.cast else "pass it in this dtype"
        rows.append((f"model input {item.name}", f"{_short(item.dtype)} at {item.module or 'the model'} ({how})"))
    if p.distributed:
        rows.append(("distributed", f"{p.distributed}; every floating parameter in {_short(p.shard_dtype)}"))
    return tuple(rows)


def plan_view(p: PreparationPlan, *, group_casts: bool = False) -> PlanView:
    """The plan as tables and rows. ``group_casts`` folds layer indices into ``*``."""
    return PlanView(
        f"backend: {p.backend} ({p.reason})",
        _cast_table(p, group_casts),
        _precision_table(p),
        _summary(p),
        tuple(p.warnings),
    )


def _text_table(t: Table) -> list[str]:
    widths = [max([len(c)] + [len(r[i]) for r in t.rows]) for i, c in enumerate(t.columns)]

    def line(cells: tuple[str, ...]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, t.numeric, strict=True)]
        return "  " + "  ".join(out).rstrip()

    return [f"{t.title}:", line(t.columns), *(line(r) for r in t.rows)]


def render_text(p: PreparationPlan) -> str:
    """The plan as plain text: one row per cast (name, shape, dtypes, bytes), then the rest."""
    view = plan_view(p)
    lines = [view.header]
    lines += _text_table(view.casts) if view.casts.rows else ["casts: none"]
    if view.precision is not None:
        lines += _text_table(view.precision)
    lines += [f"{label}: {value}" for label, value in view.summary]
    lines += [f"warning ({w.kind}): {w}" for w in view.warnings]
    return "\n".join(lines)


set_text_renderer(render_text)
