"""The ``import`` part: ``import kbitprep`` against ``import torch`` and ``import peft``, each in a
fresh interpreter, interleaved, median of ``--import-repeats``."""

from __future__ import annotations

import argparse

from common import Row, import_seconds, median


def run(args: argparse.Namespace, rows: list[Row]) -> None:
    print("import time ...", flush=True)
    times: dict[str, list[float]] = {"torch": [], "kbitprep": [], "peft": []}
    for i in range(args.import_repeats):
        for mod in ("torch", "kbitprep", "peft") if i % 2 == 0 else ("peft", "kbitprep", "torch"):
            times[mod].append(import_seconds(mod))
    t_torch, t_kbit, t_peft = (median(times[m]) for m in ("torch", "kbitprep", "peft"))
    rows.append(Row("import time vs import torch", t_kbit, t_torch, "s", "<= 1.05", baseline="import torch"))
    rows.append(Row("import time vs import peft", t_kbit, t_peft, "s", baseline="import peft"))
