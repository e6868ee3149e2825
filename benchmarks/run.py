"""kbitprep against peft 0.21.2's ``prepare_model_for_kbit_training``, side by side in one process.

Usage: ``python benchmarks/run.py [--steps N] [--ckpt-steps N] [--only PART ...] [--out DIR] [--merge]``
(``nox -s bench`` runs it with the defaults). It prints a table (kbitprep / baseline ratios, each
target met or missed) and writes ``benchmarks/results.json`` (one object per metric, tagged with
its part), ``benchmarks/results.png`` and ``benchmarks/run-info.json`` (settings, every step's
loss, time and RSS, each tracked step's live tensor peak, the plans' decisions).

Parts (``--only`` picks some; a partial run writes its files only when ``--out`` is given, and
with ``--merge`` its rows replace the same parts' rows of the results.json already in ``--out``,
default ``benchmarks/``, the other rows kept in place):

- ``import``: ``import kbitprep`` against ``import torch`` and ``import peft``, each in a fresh
  interpreter, interleaved, median of ``--import-repeats``;
- ``prepare``: prepare wall time, parameter bytes after prepare and peak RSS during prepare on a
  134.5 M-parameter Llama with SmolLM2-135M's shape in bf16 flagged 4-bit by hand, and on the real
  SmolLM2-135M-Instruct quantized nf4 by bitsandbytes; median of ``--repeats``, interleaved;
- ``training`` (issue 11's targets): SmolLM2 nf4, fp32 compute, LoRA r=8 on q_proj/v_proj,
  batch ``--batch-size`` x ``--seq-len`` (4 x 128). Five models in one process (peft, kbitprep
  defaults, kbitprep with ``keep_in_low_precision=("lm_head", "embed_tokens")``, kbitprep with
  ``upcast="none"``, and, as a diagnostic, the keep setting with peft's ``use_reentrant=True``)
  train on the same batches, one step each in turn, the order rotated every round. Step 1 (same
  batch, same LoRA initialisation: torch seeded before each ``get_peft_model``) is the warm-up and
  gives the losses compared bit for bit; the next ``--steps`` steps are timed. Step-time ratio =
  median over rounds of (variant's step / peft's step in the same round), so that load from
  other processes falls on both alike. Then one more round, untimed, runs each model's step
  under the live-tensor tracker (``kbitprep._estimate.measure_step``: a ``TorchDispatchMode``
  seeded with every tensor alive before the step, weights, quantization state, adapters,
  optimizer states and the batch): peak live tensor bytes over a step = the most bytes of live
  tensor storages at any point of that step, the memory rows' measure. Secondary, allocator-
  dependent: peak RSS over a step = peak RSS during a timed step minus RSS just before it (freed
  heap handed back with ``malloc_trim`` first), median over the timed steps. Persistent upcast
  bytes = parameter bytes after prepare minus before;
- ``checkpointing`` (issue 13): kbitprep's checkpointing options against its all-layer
  checkpointing, interleaved the same way. ``activation_offload=True`` at ``--ckpt-batch-size`` x
  ``--ckpt-seq-len`` (8 x 256), LoRA r=8 q/v on every layer, ``--ckpt-steps`` timed steps; then
  ``checkpoint_every_n_layers=2`` and ``checkpoint_trainable_blocks_only=True`` at the training
  batch with LoRA on the last ``--last-layers`` layers only, ``--steps`` timed steps; memory as in
  ``training`` (one tracked step per model, RSS secondary);
- ``options`` (issue 16, ``benchmarks/options.py``): keep with bf16 compute (one step of peft,
  defaults and keep at ``--options-batch-size`` x ``--options-seq-len``: step-1 losses and logits
  dtypes compared bit for bit, persistent upcast bytes), and the live activation bytes a training
  forward leaves for the backward with LoRA on the first, a middle and the last block, for every
  block checkpointed, ``checkpoint_trainable_blocks_only`` and ``checkpoint_every_n_layers=2``;
  and the per-forward cost of what ``prepare`` installs (``benchmarks/overhead.py``).

A step is forward + backward + AdamW step. The tracker slows a step down, so no timed step runs
under it. Peak RSS is read from the kernel's high-water mark
(``/proc/self/status`` VmHWM, reset per step through ``/proc/self/clear_refs``); where that is
not available a thread samples RSS every 0.5 ms instead. The training and checkpointing parts run
torch on ``--threads`` threads (default 1): on a shared 2-core machine two threads slow down
several-fold whenever another process takes a core, one thread does not, and the ratios are what
is compared. Each step-time row also gives, as cross-checks, the median per-step ratio of CPU time
and the ratio of the two variants' best steps.

Runtime on this project's 2 CPU cores with the defaults: about 12 minutes when the machine is
otherwise idle (a 4 x 128 step takes about 5 s on one thread, an 8 x 256 step about 20 s), up to
about 25 under other load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEEP = ("lm_head", "embed_tokens")
PEFT = "peft 0.21.2"
PARTS = ("import", "prepare", "training", "checkpointing", "options")


@dataclass
class Row:
    """One metric: kbitprep's value, the baseline's, the ratio and the verdict against a target.

    Targets: ``"<= X"`` (ratio at most X), ``"<= X within noise"`` (ratio at most X, or X inside
    the confidence interval, of at least 90 % coverage, of the median per-step ratio), ``"within X%"``, ``"bit-exact"``
    (the two values equal), or ``""`` (reported only).
    """

    name: str
    kbitprep: float
    peft: float
    unit: str
    target: str = ""
    baseline: str = PEFT
    note: str = ""
    ratio_value: float | None = None  # when the ratio is not kbitprep / peft (median of per-step ratios)
    interval: tuple[float, float, float] | None = None  # (low, high, coverage) of that median
    part: str = ""  # the part of the run that made the row (set by main)

    @property
    def ratio(self) -> float | None:
        if self.ratio_value is not None:
            return self.ratio_value
        return self.kbitprep / self.peft if self.peft else None

    def _spread(self) -> str:
        if self.interval is None:
            return ""
        lo, hi, cov = self.interval
        return f"; {cov:.0%} CI of the median ratio {lo:.3f}-{hi:.3f}"

    def verdict(self) -> tuple[bool | None, str]:
        r = self.ratio
        if self.target == "bit-exact":
            same = self.kbitprep == self.peft
            return same, (
                ""
                if same
                else f"missed: {self.kbitprep!r} vs {self.peft!r} ({float(self.kbitprep) - float(self.peft):+.3g})"
            )
        if not self.target or r is None:
            return None, ""
        if self.target.startswith("<="):
            limit = float(self.target[2:].split()[0])
            if r <= limit:
                return True, f"met ({r:.3f}x{self._spread()})"
            if self.target.endswith("within noise") and self.interval is not None and self.interval[0] <= limit:
                return (
                    True,
                    f"met within noise: median {r:.3f}x > {limit}x, but {limit}x is inside the{self._spread()[1:]}",
                )
            return False, f"missed: {r:.3f}x vs {limit}x ({r / limit - 1:+.1%}{self._spread()})"
        if self.target.startswith("within"):
            limit = float(self.target.split()[1].rstrip("%")) / 100
            ok = abs(r - 1) <= limit
            return ok, "" if ok else f"missed: off by {abs(r - 1):.2%} (limit {limit:.0%})"
        return None, ""

    def to_dict(self) -> dict[str, Any]:
        ok, how = self.verdict()
        note = "; ".join(x for x in (how if ok is False or (ok and "within noise" in how) else "", self.note) if x)
        return {
            "name": self.name,
            "kbitprep": self.kbitprep,
            "peft": self.peft,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "unit": self.unit,
            "baseline": self.baseline,
            "target": self.target or None,
            "met": ok,
            "note": note or None,
            "detail": how or None,
            "ratio_interval": None if self.interval is None else [round(x, 4) for x in self.interval],
            "part": self.part or None,
        }


# -- measuring helpers ---------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def median_interval(xs: list[float], coverage: float = 0.9) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median from order statistics: the widest
    symmetric pair ``(x_(k), x_(n-k+1))`` is narrowed while its coverage stays >= ``coverage``."""
    s = sorted(xs)
    n = len(s)

    def cov(k: int) -> float:  # P(x_(k) <= median <= x_(n-k+1)) = 1 - 2 P(Binom(n, 1/2) <= k-1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= n // 2 and cov(k + 1) >= coverage:
        k += 1
    return s[k - 1], s[n - k], cov(k)


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "KBITPREP_DISABLE_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def param_bytes(model: Any) -> int:
    from kbitprep.backends.base import model_param_bytes

    return model_param_bytes(model)


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _trim_heap() -> None:
    """Collect garbage and hand freed heap back to the system (glibc), so that a step's RSS
    growth is not hidden by memory an earlier step freed but the allocator kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    assert match is not None
    return int(match.group(1)) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS of this process while active: the kernel's high-water mark, reset on entry; or,
    where it cannot be reset, a thread sampling RSS every 0.5 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.0005)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss()
        if not _reset_hwm():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss())
        else:
            self.peak = max(_hwm_bytes(), rss())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def peak_rss_method() -> str:
    return "VmHWM reset per step" if _reset_hwm() else "RSS sampled every 0.5 ms"


# -- preparers -----------------------------------------------------------------------------------


def peft_prepare(model: Any) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model)


def kbit_prepare(gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any) -> Callable[[Any], Any]:
    def prepare(model: Any) -> Any:
        import kbitprep

        return kbitprep.prepare(model, True, gradient_checkpointing_kwargs, **options)

    return prepare


PREPARERS: dict[str, Callable[[Any], Any]] = {
    "peft": peft_prepare,
    "kbitprep": kbit_prepare(),
    "keep": kbit_prepare(keep_in_low_precision=KEEP),
    "none": kbit_prepare(upcast="none"),
    # a diagnostic: keep with peft's checkpointing mode (peft leaves use_reentrant to torch: True)
    "keep reentrant": kbit_prepare(keep_in_low_precision=KEEP, gradient_checkpointing_kwargs={"use_reentrant": True}),
}


def measure_prepare(source: Any, repeats: int, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Prepare fresh copies of ``source``, preparers interleaved; wall times, bytes, peak RSS
    during prepare minus RSS after it."""
    out: dict[str, dict[str, Any]] = {n: {"seconds": [], "rss": []} for n in names}
    out["before"] = {"bytes": param_bytes(source)}
    for i in range(repeats):
        for name in names if i % 2 == 0 else tuple(reversed(names)):
            model = copy.deepcopy(source)
            _trim_heap()
            with PeakRSS() as peak:
                t = time.perf_counter()
                PREPARERS[name](model)
                out[name]["seconds"].append(time.perf_counter() - t)
            out[name]["rss"].append(max(0, peak.peak - rss()))
            out[name]["bytes"] = param_bytes(model)
            del model
            _trim_heap()
    return out


# -- the models ----------------------------------------------------------------------------------


def prepare_rows(res: dict[str, dict[str, Any]], timed: str, sized: str) -> list[Row]:
    """Prepare time (target <= 1.0x peft), parameter bytes after and peak RSS during prepare."""
    return [
        Row(
            f"prepare time, {timed}", median(res["kbitprep"]["seconds"]), median(res["peft"]["seconds"]), "s", "<= 1.0"
        ),
        Row(
            f"param bytes after prepare, {sized}",
            res["kbitprep"]["bytes"],
            res["peft"]["bytes"],
            "bytes",
            note="same policy as peft",
        ),
        Row(
            f"peak RSS in prepare - after, {sized}", median(res["kbitprep"]["rss"]), median(res["peft"]["rss"]), "bytes"
        ),
    ]


def smollm2_shaped_bf16() -> Any:
    """134.5 M parameters with SmolLM2-135M's shape, random init, bf16, flagged 4-bit by hand."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134_515_008) < 1_000, n
    return model


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_nf4(compute_dtype: Any) -> Any:
    """SmolLM2-135M-Instruct (the demo's bf16 copy) quantized nf4 with double quantization by
    bitsandbytes on CPU; float parameters stay bf16, matmuls run in ``compute_dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kbitprep import demo

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        demo.default_model_dir(print), dtype=torch.bfloat16, device_map="cpu", quantization_config=config
    )


# -- interleaved training ------------------------------------------------------------------------


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
    from kbitprep import _hf

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
    _trim_heap()
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

    _trim_heap()
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
    _trim_heap()


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


RSS_NOTE = "allocator-dependent (glibc heap holes), not a target; peak RSS during a timed step minus RSS just before it"


def make_batches(n: int, seq_len: int, batch_size: int, seed: int) -> list[Any]:
    import torch

    from kbitprep import demo

    tokenizer = demo.load_tokenizer(demo.default_model_dir())
    train_ids = demo.tokenize(tokenizer, demo.corpus()[0])
    generator = torch.Generator().manual_seed(seed)
    return [demo.train_windows(train_ids, seq_len, batch_size, generator) for _ in range(n)]


def _release(runs: dict[str, Trained]) -> None:
    for run in runs.values():
        run.model = run.opt = None
    _trim_heap()


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


# -- the parts -----------------------------------------------------------------------------------


def part_import(args: argparse.Namespace, rows: list[Row]) -> None:
    print("import time ...", flush=True)
    times: dict[str, list[float]] = {"torch": [], "kbitprep": [], "peft": []}
    for i in range(args.import_repeats):
        for mod in ("torch", "kbitprep", "peft") if i % 2 == 0 else ("peft", "kbitprep", "torch"):
            times[mod].append(import_seconds(mod))
    t_torch, t_kbit, t_peft = (median(times[m]) for m in ("torch", "kbitprep", "peft"))
    rows.append(Row("import time vs import torch", t_kbit, t_torch, "s", "<= 1.05", baseline="import torch"))
    rows.append(Row("import time vs import peft", t_kbit, t_peft, "s", baseline="import peft"))


def part_prepare(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    print("134.5M bf16 model flagged 4-bit: prepare ...", flush=True)
    synth = smollm2_shaped_bf16()
    res = measure_prepare(synth, args.repeats, ("kbitprep", "peft"))
    info["prepare_134.5M_bf16"] = res
    del synth
    _trim_heap()
    rows += prepare_rows(res, "134.5M bf16 flagged 4-bit", "134.5M bf16")

    print("SmolLM2-135M-Instruct nf4: prepare ...", flush=True)
    res = measure_prepare(nf4, args.repeats, ("kbitprep", "peft", "keep"))
    info["prepare_nf4"] = res
    rows += prepare_rows(res, "SmolLM2 nf4", "SmolLM2 nf4")
    rows.insert(
        len(rows) - 2,
        Row(
            "prepare time, SmolLM2 nf4, keep lm_head+embed",
            median(res["keep"]["seconds"]),
            median(res["peft"]["seconds"]),
            "s",
        ),
    )


def part_training(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    print(
        f"LoRA training (issue 11): {args.steps} timed steps + 1 warm-up + 1 tracked of {args.batch_size}x"
        f"{args.seq_len} tokens, five models stepped in turn ...",
        flush=True,
    )
    variants = [Variant(n, PREPARERS[n]) for n in ("peft", "kbitprep", "keep", "none", "keep reentrant")]
    batches = make_batches(args.steps + 2, args.seq_len, args.batch_size, seed=0)
    runs = train_interleaved(nf4, variants, batches, "training")
    info["training"] = run_record(runs)
    peft, kb, keep, none, keep_re = (runs[n] for n in ("peft", "kbitprep", "keep", "none", "keep reentrant"))
    n_timed = args.steps

    same = sum(kb.dtypes.get(n) == d for n, d in peft.dtypes.items()) if kb.dtypes.keys() == peft.dtypes.keys() else -1
    differ = [n for n, d in peft.dtypes.items() if kb.dtypes.get(n) != d]
    rows.append(
        Row(
            "defaults: parameters with peft's dtype",
            float(same),
            float(len(peft.dtypes)),
            "count",
            "bit-exact",
            note="; ".join(differ[:3]) if differ else "every parameter's dtype as peft's",
        )
    )
    rows.append(
        Row("defaults: step-1 loss", kb.losses[0], peft.losses[0], "loss", "bit-exact", note=f"{kb.losses[0].hex()}")
    )
    all_equal = kb.losses == peft.losses
    rows.append(
        Row(
            f"defaults: loss at step {n_timed + 1}",
            kb.losses[-1],
            peft.losses[-1],
            "loss",
            "bit-exact",
            note="all steps bit-identical" if all_equal else "steps differ",
        )
    )
    r, ci, how = step_ratio(runs, "kbitprep", "peft")
    rows.append(
        Row(
            "defaults: step time",
            timed(kb),
            timed(peft),
            "s",
            "<= 1.0 within noise",
            ratio_value=r,
            interval=ci,
            note=how,
        )
    )
    rows.append(
        Row(
            "defaults: peak live tensor bytes over a step",
            live_peak(kb),
            live_peak(peft),
            "bytes",
            note=f"use_reentrant: kbitprep {kb.plan.get('use_reentrant')}, peft True (torch's default); "
            + live_note(kb, peft),
        )
    )
    rows.append(Row("defaults: peak RSS over a step (secondary)", rss_step(kb), rss_step(peft), "bytes", note=RSS_NOTE))

    rows.append(
        Row(
            "keep lm_head+embed: step-1 loss",
            keep.losses[0],
            peft.losses[0],
            "loss",
            "bit-exact",
            note=f"{keep.losses[0].hex()}",
        )
    )
    rows.append(
        Row("keep lm_head+embed: persistent upcast bytes", keep.upcast_bytes, peft.upcast_bytes, "bytes", "<= 0.05")
    )
    r, ci, how = step_ratio(runs, "keep", "peft")
    rows.append(
        Row(
            "keep lm_head+embed: step time",
            timed(keep),
            timed(peft),
            "s",
            "<= 1.05",
            ratio_value=r,
            interval=ci,
            note=how,
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed: peak live tensor bytes over a step",
            live_peak(keep),
            live_peak(peft),
            "bytes",
            "<= 1.0",
            note=live_note(keep, peft),
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed: peak RSS over a step (secondary)",
            rss_step(keep),
            rss_step(peft),
            "bytes",
            note=RSS_NOTE,
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed: live tensor bytes added over a step",
            live_added(keep),
            live_added(peft),
            "bytes",
            note="peak of the step minus the live bytes before it (activations, gradients, weights brought up at use)",
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed: peak live tensor bytes over a step vs kbitprep defaults",
            live_peak(keep),
            live_peak(kb),
            "bytes",
            baseline="kbitprep defaults",
            note="same checkpointing mode (use_reentrant=False); " + live_note(keep, kb),
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed: peak RSS over a step vs kbitprep defaults (secondary)",
            rss_step(keep),
            rss_step(kb),
            "bytes",
            baseline="kbitprep defaults",
            note=RSS_NOTE,
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed, use_reentrant=True: peak live tensor bytes over a step",
            live_peak(keep_re),
            live_peak(peft),
            "bytes",
            note="diagnostic: peft's checkpointing mode; not a target; " + live_note(keep_re, peft),
        )
    )
    rows.append(
        Row(
            "keep lm_head+embed, use_reentrant=True: peak RSS over a step (secondary)",
            rss_step(keep_re),
            rss_step(peft),
            "bytes",
            note="diagnostic; " + RSS_NOTE,
        )
    )
    r, ci, how = step_ratio(runs, "keep reentrant", "peft")
    rows.append(
        Row(
            "keep lm_head+embed, use_reentrant=True: step time",
            timed(keep_re),
            timed(peft),
            "s",
            ratio_value=r,
            interval=ci,
            note="diagnostic: peft's checkpointing mode; not a target; " + how,
        )
    )

    rows.append(
        Row('upcast="none": step-1 loss', none.losses[0], peft.losses[0], "loss", note=f"{none.losses[0].hex()}")
    )
    rows.append(Row('upcast="none": persistent upcast bytes', none.upcast_bytes, peft.upcast_bytes, "bytes"))
    r, ci, how = step_ratio(runs, "none", "peft")
    rows.append(
        Row(
            'upcast="none": step time',
            timed(none),
            timed(peft),
            "s",
            "<= 1.05",
            ratio_value=r,
            interval=ci,
            note=how,
        )
    )
    rows.append(
        Row(
            'upcast="none": peak live tensor bytes over a step',
            live_peak(none),
            live_peak(peft),
            "bytes",
            note=live_note(none, peft),
        )
    )
    rows.append(
        Row('upcast="none": peak RSS over a step (secondary)', rss_step(none), rss_step(peft), "bytes", note=RSS_NOTE)
    )
    _release(runs)


def part_checkpointing(args: argparse.Namespace, rows: list[Row], nf4: Any, info: dict[str, Any]) -> None:
    b, s = args.ckpt_batch_size, args.ckpt_seq_len
    print(
        f"activation offload (issue 13): {args.ckpt_steps} timed steps + 1 warm-up + 1 tracked of {b}x{s} tokens ...",
        flush=True,
    )
    variants = [
        Variant("without offload", kbit_prepare()),
        Variant("activation_offload=True", kbit_prepare(activation_offload=True)),
    ]
    runs = train_interleaved(nf4, variants, make_batches(args.ckpt_steps + 2, s, b, seed=1), "offload")
    info["offload"] = run_record(runs)
    base, offload = runs["without offload"], runs["activation_offload=True"]
    applied = offload.plan.get("activation_offload")
    why = "; ".join(w for w in offload.plan.get("warnings", []) if "activation_offload" in w)
    decision = "plan applied offload" if applied else "plan did not apply offload: " + (why or "no reason given")
    base_name = f"without offload, {base.checkpointed} of 30 layers checkpointed"
    rows.append(
        Row(
            f"activation_offload=True: peak live tensor bytes over a {b}x{s} step",
            live_peak(offload),
            live_peak(base),
            "bytes",
            baseline=base_name,
            note=f"{decision}; {live_note(offload, base)}",
        )
    )
    rows.append(
        Row(
            f"activation_offload=True: peak RSS over a {b}x{s} step (secondary)",
            rss_step(offload),
            rss_step(base),
            "bytes",
            baseline=base_name,
            note=RSS_NOTE,
        )
    )
    r, ci, how = step_ratio(runs, "activation_offload=True", "without offload")
    rows.append(
        Row(
            f"activation_offload=True: {b}x{s} step time",
            timed(offload),
            timed(base),
            "s",
            baseline=base_name,
            ratio_value=r,
            interval=ci,
            note=how,
        )
    )
    _release(runs)

    last = tuple(range(30 - args.last_layers, 30))
    b, s = args.batch_size, args.seq_len
    print(
        f"checkpointing layouts (issue 13): LoRA on the last {args.last_layers} layers, {args.steps} timed steps "
        f"+ 1 warm-up + 1 tracked of {b}x{s} tokens ...",
        flush=True,
    )
    variants = [
        Variant("all layers", kbit_prepare(), layers=last),
        Variant("every 2nd layer", kbit_prepare(checkpoint_every_n_layers=2), layers=last),
        Variant("trainable blocks only", kbit_prepare(checkpoint_trainable_blocks_only=True), layers=last),
    ]
    runs = train_interleaved(nf4, variants, make_batches(args.steps + 2, s, b, seed=2), "layouts")
    info["layouts"] = run_record(runs)
    base = runs["all layers"]
    base_name = f"all {base.checkpointed} layers checkpointed"
    where = f"{b}x{s} step, LoRA on last {args.last_layers}"
    for name, option in (
        ("every 2nd layer", "checkpoint_every_n_layers=2"),
        ("trainable blocks only", "checkpoint_trainable_blocks_only"),
    ):
        run = runs[name]
        rows.append(
            Row(
                f"{option}: peak live tensor bytes over a {where}",
                live_peak(run),
                live_peak(base),
                "bytes",
                baseline=base_name,
                note=f"{run.checkpointed} of 30 layers checkpointed at training time; {live_note(run, base)}",
            )
        )
        rows.append(
            Row(
                f"{option}: peak RSS over a {where} (secondary)",
                rss_step(run),
                rss_step(base),
                "bytes",
                baseline=base_name,
                note=RSS_NOTE,
            )
        )
        r, ci, how = step_ratio(runs, name, "all layers")
        rows.append(
            Row(
                f"{option}: time of a {where}",
                timed(run),
                timed(base),
                "s",
                baseline=base_name,
                ratio_value=r,
                interval=ci,
                note=how,
            )
        )
    _release(runs)


def part_options(args: argparse.Namespace, rows: list[Row], info: dict[str, Any]) -> None:
    """Issue 16: keep's numerics with bf16 compute, and the activation bytes selective
    checkpointing leaves for the backward (benchmarks/options.py measures; this makes rows)."""
    import options
    import torch

    b, s = args.options_batch_size, args.options_seq_len
    print(f"keep with bf16 compute (issue 16): one {b}x{s} step each of peft, defaults, keep ...", flush=True)
    nf4_bf16 = load_nf4(torch.bfloat16)
    batch = make_batches(1, s, b, seed=3)[0]
    res = options.keep_numerics(nf4_bf16, {n: PREPARERS[n] for n in ("peft", "kbitprep", "keep")}, batch)
    info["keep_bf16_compute"] = res
    del nf4_bf16
    _trim_heap()
    peft, kb, keep = res["peft"], res["kbitprep"], res["keep"]
    where = f"bf16 compute, {b}x{s}"
    same_dtype = keep["logits_dtype"] == kb["logits_dtype"] == peft["logits_dtype"]
    rows.append(
        Row(
            f"keep vs defaults: step-1 loss, {where}",
            keep["loss"],
            kb["loss"],
            "",
            "bit-exact",
            baseline="kbitprep defaults",
        )
    )
    rows.append(Row(f"keep vs peft: step-1 loss, {where}", keep["loss"], peft["loss"], "", "bit-exact"))
    rows.append(
        Row(
            f"keep: logits dtype as peft's, {where}",
            float(same_dtype),
            1.0,
            "count",
            "bit-exact",
            note=f"keep {keep['logits_dtype']}, defaults {kb['logits_dtype']}, peft {peft['logits_dtype']}",
        )
    )
    rows.append(
        Row(
            f"keep: persistent upcast bytes, {where}",
            float(keep["upcast_bytes"]),
            float(peft["upcast_bytes"]),
            "bytes",
            "<= 0.05",
            note=f"lm_head stored {keep['lm_head_dtype']} (peft: {peft['lm_head_dtype']})",
        )
    )

    import overhead

    print("per-forward overhead of what prepare installs (issue 16) ...", flush=True)
    cost = overhead.measure(args.overhead_repeats)
    info["per_forward_overhead"] = cost
    _trim_heap()
    rows.append(
        Row(
            "keep: installed cost per 1-token forward (eval, generate step)",
            cost["installed_s"],
            cost["forward_1tok_eval_s"],
            "s",
            "<= 0.005",
            baseline="1-token forward, SmolLM2 nf4",
            note=f"adoption hook {cost['hook_s'] * 1e6:.1f} us + registration hooks {cost['registration_hooks_s'] * 1e6:.1f} us",
        )
    )
    rows.append(
        Row(
            "keep: installed cost per 1-token forward (train)",
            cost["installed_s"],
            cost["forward_1tok_train_s"],
            "s",
            "<= 0.005",
            baseline="1-token forward, SmolLM2 nf4",
            note=f"walks in 3 train forwards + 16-token generate: {cost['walks_by_hook_in_3_train_forwards_and_16_token_generate']}; "
            f"one walk (paid every forward before): {cost['walk_s'] * 1e3:.2f} ms",
        )
    )

    positions = {"first": 0, "middle": 15, "last": 29}
    layouts = {
        "all blocks": kbit_prepare(),
        "trainable blocks only": kbit_prepare(checkpoint_trainable_blocks_only=True),
        "every 2nd block": kbit_prepare(checkpoint_every_n_layers=2),
    }
    b, s = args.batch_size, args.seq_len
    print(f"saved activation bytes (issue 16): LoRA on one block, {b}x{s}, three layouts ...", flush=True)
    batch = make_batches(1, s, b, seed=4)[0]
    saved = options.saved_bytes(nf4_fp32 := load_nf4(getattr(torch, args.compute_dtype)), layouts, positions, batch)
    del nf4_fp32
    _trim_heap()
    info["saved_activation_bytes"] = saved
    for where_, by_layout in saved.items():
        base = by_layout["all blocks"]
        for name in ("trainable blocks only", "every 2nd block"):
            target = "<= 1.0" if name == "trainable blocks only" else ""
            rows.append(
                Row(
                    f"{name}: activation bytes kept for the backward, LoRA on the {where_} block, {b}x{s}",
                    float(by_layout[name]),
                    float(base),
                    "bytes",
                    target,
                    baseline="every block checkpointed",
                    note="live tensor bytes after the forward (TorchDispatchMode tracker), not RSS",
                )
            )


# -- output --------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1e6:,.2f} MB"
    if unit == "s":
        return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
    if unit == "count":
        return f"{value:,.0f}"
    return repr(value) if unit == "loss" else f"{value:.6f}"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (
        ("metric", "left"),
        ("kbitprep", "right"),
        ("baseline", "right"),
        ("ratio", "right"),
        ("target", "right"),
        ("result", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ok, how = row.verdict()
        base = fmt(row.peft, row.unit) + ("" if row.baseline == PEFT else f" ({row.baseline})")
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}x"
        verdict = ("met" if ok and "within noise" not in how else how) if ok is not None else ""
        result = "; ".join(x for x in (verdict, row.note) if x)
        table.add_row(row.name, fmt(row.kbitprep, row.unit), base, ratio, row.target or "-", result)
    Console(width=200).print(table)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """The ratios of ``rows`` (results.json's objects) as bars, coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ratio(r: dict[str, Any]) -> float:  # unrounded where it is kbitprep / baseline
        return float(r["ratio"] if r.get("ratio_interval") or not r["peft"] else r["kbitprep"] / r["peft"])

    shown = [r for r in rows if r["ratio"] is not None and r["ratio"] > 0 and r["unit"] != "count"][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.6))
    colors = ["#2e7d32" if r["met"] else ("#c62828" if r["met"] is False else "#607d8b") for r in shown]
    ax.barh([r["name"] for r in shown], [ratio(r) for r in shown], color=colors)
    for y, r in enumerate(shown):
        target = r.get("target") or ""
        if target.startswith("<="):
            limit = float(target[2:].split()[0])
            ax.plot([limit, limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
        if r.get("ratio_interval"):
            ax.plot(r["ratio_interval"][:2], [y, y], color="black", linewidth=0.8)
        ax.text(ratio(r) * 1.05, y, f"{ratio(r):.3f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(
        "kbitprep / baseline (log scale; lower is better)\nblack tick: target; thin line: CI of a step-time median ratio"
    )
    fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per prepare timing (median); default 5")
    parser.add_argument("--import-repeats", type=int, default=5, help="fresh interpreters per import timing; default 5")
    parser.add_argument(
        "--steps",
        type=int,
        default=6,
        help="timed LoRA steps per model after 1 warm-up (then 1 untimed step under the live-tensor tracker), "
        "training and selective checkpointing; default 6",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--ckpt-steps",
        type=int,
        default=3,
        help="timed steps per model of the offload comparison after 1 warm-up (then 1 tracked); default 3",
    )
    parser.add_argument("--options-seq-len", type=int, default=64, help="bf16-compute keep step (issue 16); default 64")
    parser.add_argument("--options-batch-size", type=int, default=2)
    parser.add_argument("--overhead-repeats", type=int, default=30, help="1-token forwards per overhead timing")
    parser.add_argument("--ckpt-seq-len", type=int, default=256)
    parser.add_argument("--ckpt-batch-size", type=int, default=8)
    parser.add_argument(
        "--last-layers",
        type=int,
        default=8,
        help="LoRA layers (the last ones) for the checkpoint_trainable_blocks_only comparison; default 8",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the training and checkpointing parts (0: torch's default); default 1, "
        "because on a shared 2-core machine two threads slow down several-fold whenever another process "
        "takes a core (each parallel region waits for the descheduled thread), one thread does not",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=("bfloat16", "float32"),
        default="float32",
        help="bitsandbytes compute dtype of the nf4 model; default float32 (issue 11's setting)",
    )
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts (files written only with --out)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the output files; default benchmarks/")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: merge the parts' rows into the files in --out (default benchmarks/), replacing "
        "those parts' earlier rows and keeping the rest",
    )
    args = parser.parse_args(argv)
    if args.out is None and (args.only is None or args.merge):
        args.out = HERE
    if args.merge and not ((args.out / "results.json").exists() and (args.out / "run-info.json").exists()):
        parser.error(f"--merge needs results.json and run-info.json in {args.out}")
    if args.steps < 1 or args.ckpt_steps < 1:
        parser.error("--steps and --ckpt-steps must be at least 1")
    return args


def merge(
    out: Path, parts: list[str], results: list[dict[str, Any]], run_info: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Merge a partial run into the files already in ``out``: its rows replace the rows of the
    same parts (by their ``part`` tag; the new rows go where the first old one of the part was,
    else at the end), its per-part records replace the same keys of run-info.json, and its title
    and settings are appended to run-info.json's ``reruns``. Returns the merged results, run info
    and the chart's title (the full run's)."""
    old_rows: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    old_info: dict[str, Any] = json.loads((out / "run-info.json").read_text())
    merged: list[dict[str, Any]] = []
    placed: set[str] = set()
    for row in old_rows:
        part = row.get("part")
        if part in parts:
            if part not in placed:
                merged += [r for r in results if r["part"] == part]
                placed.add(part)
            continue
        merged.append(row)
    merged += [r for r in results if r["part"] not in placed]
    meta = ("title", "versions", "minutes", "settings")
    for key, value in run_info.items():
        if key not in meta:
            old_info[key] = value
    old_info.setdefault("reruns", []).append({k: run_info[k] for k in meta})
    title = str(old_info.get("title", run_info["title"])) + f"; rerun: {', '.join(parts)}"
    return merged, old_info, title


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    parts = args.only or list(PARTS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    started = time.perf_counter()

    import torch

    torch.manual_seed(0)
    import peft
    import transformers

    import kbitprep

    versions = (
        f"kbitprep {kbitprep.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"{versions}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, peak RSS: {peak_rss_method()}",
        flush=True,
    )
    rows: list[Row] = []
    info: dict[str, Any] = {}

    def tag(part: str, first: int) -> None:
        for row in rows[first:]:
            row.part = part

    if "import" in parts:
        part_import(args, rows)
        tag("import", 0)
    nf4 = None
    if set(parts) & {"prepare", "training", "checkpointing"}:
        print(f"SmolLM2-135M-Instruct nf4 (compute dtype {args.compute_dtype}): load ...", flush=True)
        nf4 = load_nf4(getattr(torch, args.compute_dtype))
        info["nf4_param_bytes"] = {"before": param_bytes(nf4)}
    if "prepare" in parts:
        first = len(rows)
        part_prepare(args, rows, nf4, info)
        tag("prepare", first)
    default_threads = torch.get_num_threads()
    if args.threads and set(parts) & {"training", "checkpointing"}:
        torch.set_num_threads(args.threads)
        print(f"training and checkpointing parts: {torch.get_num_threads()} torch thread(s)", flush=True)
    if "training" in parts:
        first = len(rows)
        part_training(args, rows, nf4, info)
        tag("training", first)
    if "checkpointing" in parts:
        first = len(rows)
        part_checkpointing(args, rows, nf4, info)
        tag("checkpointing", first)
    if "options" in parts:
        first = len(rows)
        part_options(args, rows, info)
        tag("options", first)

    minutes = (time.perf_counter() - started) / 60
    title = (
        f"kbitprep {kbitprep.__version__} vs peft {peft.__version__} (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {os.cpu_count()} CPU cores; SmolLM2-135M nf4, compute {args.compute_dtype}; "
        f"LoRA r=8 q/v; {torch.get_num_threads()} torch thread(s); {args.steps} timed steps of {args.batch_size}x{args.seq_len}, "
        f"{args.ckpt_steps} of {args.ckpt_batch_size}x{args.ckpt_seq_len}; medians)"
    )
    print_table(rows, title)
    for row in rows:
        ok, how = row.verdict()
        if ok is False:
            print(f"target missed: {row.name}: {how}")
    print(f"{minutes:.1f} min")
    if args.out is None:
        print("partial run (--only): no files written; pass --out DIR to keep them")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = [r.to_dict() for r in rows]
    run_info: dict[str, Any] = {
        "title": title,
        "versions": versions,
        "minutes": round(minutes, 1),
        "settings": {
            "parts": parts,
            "repeats": args.repeats,
            "import_repeats": args.import_repeats,
            "steps": args.steps,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "ckpt_steps": args.ckpt_steps,
            "ckpt_seq_len": args.ckpt_seq_len,
            "ckpt_batch_size": args.ckpt_batch_size,
            "last_layers": args.last_layers,
            "keep_in_low_precision": list(KEEP),
            "lora": "r=8, alpha=16, dropout 0, q_proj+v_proj, AdamW lr 2e-3; torch.manual_seed(0) before each get_peft_model",
            "step": "forward + backward + AdamW step; step 1 is the warm-up, the rest are timed",
            "nf4_compute_dtype": args.compute_dtype,
            "peak_live_tensor_bytes": "one untimed step per model after the timed ones, under "
            "kbitprep._estimate.measure_step (TorchDispatchMode storage tracker seeded with every tensor alive "
            "before the step); the memory rows",
            "peak_rss": peak_rss_method()
            + " (growth = peak during the step - RSS just before it, after gc + malloc_trim); secondary rows",
            "cpu_bf16_native": cpu_has_fast_bf16(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(),
            "threads": {"import_and_prepare": default_threads, "training_and_checkpointing": torch.get_num_threads()},
            "load_average_at_end": list(os.getloadavg()),
        },
        **info,
    }
    if args.merge:
        results, run_info, title = merge(args.out, parts, results, run_info)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "run-info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    plot(results, args.out / "results.png", title)
    print(f"wrote results.json, results.png and run-info.json to {args.out} in {minutes:.1f} min")
    assert all(math.isfinite(float(r.kbitprep)) and math.isfinite(float(r.peft)) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
