"""``import kbitprep`` imports torch and nothing heavier (DESIGN.md, issue 2).

Each check runs in a fresh interpreter: the test process itself has long imported transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "peft", "accelerate", "bitsandbytes", "torchao", "hqq", "gptqmodel", "aqlm", "eetq", "optimum")


def _loaded_after(code: str, env_extra: dict[str, str] | None = None) -> list[str]:
    import os

    script = (
        "import sys, json\n"
        f"{code}\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy})))\n"
    )
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_import_kbitprep_loads_no_backend_library() -> None:
    assert _loaded_after("import kbitprep") == []


def test_import_keeps_torch_only() -> None:
    loaded = _loaded_after("import kbitprep\nassert 'torch' in sys.modules")
    assert loaded == []


def test_listing_and_detecting_on_a_plain_module_import_no_backend_library() -> None:
    """A backend imports its library only when it is detected or asked for: listing backends and
    detecting an unquantized torch model must not pull any of them in."""
    code = (
        "import torch, kbitprep\n"
        "kbitprep.available_backends()\n"
        "d = kbitprep.detect_backend(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)))\n"
        "assert d.backend == 'none', d\n"
    )
    assert _loaded_after(code) == []
