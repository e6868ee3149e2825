"""What every part of ``benchmarks/run.py`` shares: the result row, the statistics, timing and
RSS helpers, the preparers compared, and the models and batches they run on."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KEEP = ("lm_head", "embed_tokens")
PEFT = "peft 0.21.2"


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
    part: str = ""  # the part of the run that made the row (set by run.py)

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


def trim_heap() -> None:
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


# -- the models and batches ----------------------------------------------------------------------


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


def make_batches(n: int, seq_len: int, batch_size: int, seed: int) -> list[Any]:
    import torch

    from kbitprep import demo

    tokenizer = demo.load_tokenizer(demo.default_model_dir())
    train_ids = demo.tokenize(tokenizer, demo.corpus()[0])
    generator = torch.Generator().manual_seed(seed)
    return [demo.train_windows(train_ids, seq_len, batch_size, generator) for _ in range(n)]
