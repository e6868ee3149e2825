"""Interleaved training, shared by the ``training`` and ``checkpointing`` parts of
``benchmarks/run.py``: variants built from one model, stepped in turn on the same batches, one
untimed step each under the live-tensor tracker, and the numbers the rows are made of."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import PEFT, PeakRSS, Row, median, median_interval, param_bytes, trim_heap

RSS_NOTE = "allocator-dependent (glibc heap holes), not a target; peak RSS during a timed step minus RSS just before it"


@dataclass
class Variant:
    name: str
    prepare: Callable[[Any], Any]
    layers: tuple[int, ...] | None = None  # LoRA only on these decoder layers (None: all)


@dataclass
class Trained:
    """One variant's model, optimizer and per-step record."""

    model: Any
    opt: Any
    upcast_bytes: int
    dtypes: dict[str, str]
    plan: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    rss_growth: list[int] = field(default_factory=list)
    checkpointed: int | None = None
    live: dict[str, Any] = field(default_factory=dict)  # the tracked step (live_step)


def _plan_summary(report: Any) -> dict[str, Any]:
    if report is None or not hasattr(report, "gradient_checkpointing"):
        return {"library": "peft"}
    keys = (
        "gradient_checkpointing",
        "use_reentrant",
        "activation_offload",
        "checkpoint_every_n_layers",
        "checkpoint_trainable_blocks_only",
        "checkpointed_blocks",
        "bytes_delta",
    )
    out: dict[str, Any] = {k: getattr(report, k, None) for k in keys}
    out["warnings"] = list(report.warnings)
    return out


def _checkpointed_blocks(model: Any) -> int | None:
    from kbitprep.steps import checkpoint_layouts as _hf

    try:
        blocks = _hf.checkpoint_blocks(model.get_base_model())
    except Exception:  # noqa: BLE001 - a count for the record only
        return None
    return sum(bool(getattr(b, "gradient_checkpointing", False)) for b in blocks)


def build(source: Any, variant: Variant) -> Trained:
    import torch
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(source)
    before = param_bytes(model)
    report = variant.prepare(model)
    after = param_bytes(model)
    dtypes = {n: str(p.dtype) for n, p in model.named_parameters()}
    torch.manual_seed(0)  # the same LoRA initialisation for every variant
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=None if variant.layers is None else list(variant.layers),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    return Trained(model, opt, after - before, dtypes, _plan_summary(report))


def step(run: Trained, batch: Any) -> None:
    trim_heap()
    with PeakRSS() as peak:
        t, c = time.perf_counter(), time.process_time()
        loss = run.model(input_ids=batch, labels=batch).loss
        loss.backward()
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    run.seconds.append(seconds)
    run.cpu_seconds.append(cpu)
    run.rss_growth.append(peak.growth)
    run.losses.append(float(loss))


def live_step(run: Trained, batch: Any) -> None:
    """One more training step under the live-tensor tracker (``kbitprep._estimate.measure_step``:
    seeded with every tensor alive before the step, then the step with its phases named). Not
    timed: the tracker sees every operator call and slows the step down. The loss is not kept."""
    from kbitprep._estimate import measure_step

    trim_heap()
    t = time.perf_counter()
    tracker = measure_step(run.model, {"input_ids": batch, "labels": batch}, run.opt)
    run.live = {
        "peak_bytes": int(tracker.peak),
        "start_bytes": int(tracker.phases[0].start),  # live before the step: everything seeded
        "peak_at": tracker.peak_at,
        "at_peak_mb": {k: round(v / 1e6, 2) for k, v in tracker.live_at_peak.items() if v},
        "seconds": round(time.perf_counter() - t, 2),
    }
    del tracker
    trim_heap()


def train_interleaved(source: Any, variants: list[Variant], batches: list[Any], label: str) -> dict[str, Trained]:
    """Build every variant from ``source``, then step them in turn on the same batches: the
    first round is the warm-up (its losses are the step-1 losses), the next ``len(batches) - 2``
    are timed, and on the last batch each model takes one untimed step under the live-tensor
    tracker (:func:`live_step`)."""
    runs = {v.name: build(source, v) for v in variants}
    names = list(runs)
    *stepped, tracked = batches
    for i, batch in enumerate(stepped):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            step(runs[name], batch)
            if i == 0:
                runs[name].checkpointed = _checkpointed_blocks(runs[name].model)
        shown = ", ".join(f"{n} {runs[n].seconds[-1]:.1f}s/{runs[n].rss_growth[-1] / 1e6:.0f}MB" for n in names)
        print(f"  {label} step {i + 1}/{len(stepped)}{' (warm-up)' if i == 0 else ''}: {shown}", flush=True)
    for name in names:
        live_step(runs[name], tracked)
    shown = ", ".join(f"{n} {runs[n].live['peak_bytes'] / 1e6:.1f}MB ({runs[n].live['seconds']:.0f}s)" for n in names)
    print(f"  {label} tracked step, peak live tensor bytes: {shown}", flush=True)
    return runs


def release(runs: dict[str, Trained]) -> None:
    for run in runs.values():
        run.model = run.opt = None
    trim_heap()


def run_record(runs: dict[str, Trained]) -> dict[str, Any]:
    return {
        n: {
            "losses": r.losses,
            "step_seconds": [round(x, 4) for x in r.seconds],
            "step_cpu_seconds": [round(x, 4) for x in r.cpu_seconds],
            "step_rss_growth_mb": [round(x / 1e6, 1) for x in r.rss_growth],
            "tracked_step": r.live,
            "upcast_bytes": r.upcast_bytes,
            "checkpointed_blocks_at_step_1": r.checkpointed,
            "plan": r.plan,
        }
        for n, r in runs.items()
    }


# -- what the rows are made of -------------------------------------------------------------------


def step_ratio(runs: dict[str, Trained], name: str, base: str) -> tuple[float, tuple[float, float, float], str]:
    """Median over the timed rounds of name's step time / base's in the same round, its CI, and a
    note with two load-robust cross-checks: the same median over CPU time (this process's threads
    only, so other processes' load inflates it far less) and the ratio of the two best steps."""
    a, b = runs[name], runs[base]
    ratios = [x / y for x, y in zip(a.seconds[1:], b.seconds[1:], strict=True)]
    cpu = median([x / y for x, y in zip(a.cpu_seconds[1:], b.cpu_seconds[1:], strict=True)])
    best = min(a.seconds[1:]) / min(b.seconds[1:])
    note = f"median of {len(ratios)} per-step wall-time ratios; CPU-time ratio {cpu:.3f}x; best-step ratio {best:.3f}x"
    return median(ratios), median_interval(ratios), note


def timed(run: Trained) -> float:
    return median(run.seconds[1:])


def step_time_row(
    runs: dict[str, Trained],
    label: str,
    name: str,
    base: str,
    target: str = "",
    baseline: str = PEFT,
    note_prefix: str = "",
) -> Row:
    """The step-time row of ``name`` against ``base``: median step times, the ratio and its CI
    from :func:`step_ratio`, whose note follows ``note_prefix``."""
    r, ci, how = step_ratio(runs, name, base)
    return Row(
        label,
        timed(runs[name]),
        timed(runs[base]),
        "s",
        target,
        baseline=baseline,
        ratio_value=r,
        interval=ci,
        note=note_prefix + how,
    )


def rss_step(run: Trained) -> float:
    return median([float(x) for x in run.rss_growth[1:]])


def live_peak(run: Trained) -> float:
    """Peak of live tensor bytes over the tracked step (everything resident included)."""
    return float(run.live["peak_bytes"])


def live_added(run: Trained) -> float:
    """Peak of live tensor bytes over the tracked step minus the live bytes before it."""
    return float(run.live["peak_bytes"] - run.live["start_bytes"])


def live_note(run: Trained, base: Trained) -> str:
    return (
        f"tracker seeded with every tensor alive before the step; live before it {run.live['start_bytes'] / 1e6:.1f} MB "
        f"vs {base.live['start_bytes'] / 1e6:.1f} MB; peak in '{run.live['peak_at']}' vs '{base.live['peak_at']}'"
    )
