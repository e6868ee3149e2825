"""Parity with ``peft.prepare_model_for_kbit_training`` (peft 0.21.2) on the tiny Llama (issue 2).

For each backend a fresh copy is loaded twice from the same saved checkpoint: one copy goes through
peft, the other through ``kbitprep.prepare_model_for_kbit_training``. Then:

- every parameter has the same dtype and ``requires_grad`` (after prepare, and again after LoRA);
- checkpointing is on in both or in neither (peft turns it on only for quantized models);
- after the standard LoRA (r=8, q_proj/v_proj, same seed) one standard step gives the same loss,
  every LoRA tensor has a grad and all 4 ``lora_B`` grads are non-zero in both.

peft passes ``gradient_checkpointing_kwargs={}``, so torch falls back to reentrant checkpointing
(and peft adds the input-grad hook); kbitprep passes ``use_reentrant=False``. The forward pass is the
same computation either way: checkpointing only changes *when* activations are recomputed in the
backward, and ``lora_B`` starts at zero, so the LoRA A initialisation does not enter the loss.
The loss is therefore expected to agree to float32 rounding. The tolerance is ``rel=1e-6`` (about
8 float32 ulps at a loss of 6.9), which allows for a different reduction order on CPU threads but
is three orders of magnitude below the effect of a single parameter left in bf16 instead of
fp32 (a norm or the lm_head kept in bf16 moves this loss by ~1e-3). The ``lora_B`` gradients are
compared with the same reasoning (``rtol=1e-5``, they pass through one more backward).

The table of results (backend x dtype / requires_grad / checkpointing / loss) is printed in the
terminal summary of every run that executes these tests, and written to
``<pytest basetemp>/parity_table.txt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _models import load, saved_tiny
from _plan_warnings import emitted_of
from _quantized import bnb4_config_or_skip, bnb8_config_or_skip, torchao_int8_config_or_skip

pytest.importorskip("peft", reason="parity tests compare against peft; pip install peft==0.21.2")


def _unquantized() -> Any:
    return None


BACKENDS: dict[str, tuple[Callable[[], Any], str]] = {
    # label: (quantization config factory, backend kbitprep must detect)
    "bnb 4-bit nf4+DQ": (bnb4_config_or_skip, "bitsandbytes"),
    "bnb 8-bit": (bnb8_config_or_skip, "bitsandbytes"),
    "torchao int8 WO": (torchao_int8_config_or_skip, "torchao"),
    "bf16 (none)": (_unquantized, "none"),
}

LOSS_REL = 1e-6
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-8

_ROWS: dict[str, dict[str, str]] = {}
_COLUMNS = (
    "backend",
    "detected",
    "params",
    "dtype",
    "requires_grad",
    "checkpointing",
    "use_reentrant",
    "loss peft",
    "loss kbitprep",
    "loss",
    "LoRA grads",
)


def _format_table() -> str:
    rows = [dict(zip(_COLUMNS, _COLUMNS, strict=True))] + [_ROWS[k] for k in BACKENDS if k in _ROWS]
    widths = {c: max(len(r.get(c, "")) for r in rows) for c in _COLUMNS}
    lines = []
    for i, r in enumerate(rows):
        lines.append(" | ".join(r.get(c, "").ljust(widths[c]) for c in _COLUMNS).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * widths[c] for c in _COLUMNS))
    return "\n".join(lines)


class _ParityReporter:
    """pytest plugin registered at run time: prints the parity table in the terminal summary."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not _ROWS:
            return
        terminalreporter.write_sep("=", "kbitprep vs peft 0.21.2 parity (tiny Llama)")
        terminalreporter.write_line(_format_table())
        terminalreporter.write_line(f"(also written to {self.path})")


@pytest.fixture(scope="module", autouse=True)
def _parity_reporter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.getbasetemp() / "parity_table.txt"
    reporter = _ParityReporter(path)
    request.config.pluginmanager.register(reporter, "kbitprep-parity-table")
    yield path
    if _ROWS:
        path.write_text(_format_table() + "\n")


def _state(model: nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


def _checkpointing_on(model: nn.Module) -> bool:
    # read the flags transformers sets on the modules, not kbitprep's helper
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _use_reentrant(model: nn.Module) -> str:
    """``use_reentrant`` as transformers stores it (``functools.partial`` keywords); "-" when off."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            keywords = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {})
            # absent means torch's implicit fallback, which is reentrant
            return str(keywords.get("use_reentrant", "True (implicit)"))
    return "-"


def _run(path: str, make_config: Callable[[], Any], who: str) -> dict[str, Any]:
    model = load(path, quantization_config=make_config())
    if who == "peft":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model)
        report = None
    else:
        report = kbitprep.prepare(model)
    prepared = _state(model)
    checkpointing = _checkpointing_on(model)
    reentrant = _use_reentrant(model)
    torch.manual_seed(0)  # same LoRA A initialisation in both copies
    peft_model = add_lora(model)
    with_lora = _state(peft_model)
    loss, grads = standard_step(peft_model)
    return {
        "prepared": prepared,
        "with_lora": with_lora,
        "checkpointing": checkpointing,
        "reentrant": reentrant,
        "loss": loss,
        "grads": grads,
        "counts": grad_counts(grads),
        "report": report,
    }


def _diff(a: dict[str, tuple[torch.dtype, bool]], b: dict[str, tuple[torch.dtype, bool]], index: int) -> list[str]:
    out = [
        f"{n}: peft {a[n][index]} vs kbitprep {b.get(n, (None, None))[index]}"
        for n in a
        if a[n][index] != b.get(n, (None, None))[index]
    ]
    out += [f"{n}: only in kbitprep" for n in b if n not in a]
    return out


@pytest.mark.parametrize("label", list(BACKENDS))
def test_matches_peft(label: str, model_root: str) -> None:
    make_config, expected_backend = BACKENDS[label]
    make_config()  # skips here, before anything runs, when the backend library is missing
    path = saved_tiny(model_root)

    ref = _run(path, make_config, "peft")
    if expected_backend == "none":
        # an unquantized model: kbitprep states the bytes peft's upcast adds, and that checkpointing
        # stays off as in peft
        with pytest.warns(kbitprep.KbitPrepWarning) as record:
            ours = _run(path, make_config, "kbitprep")
        assert emitted_of(record, kbitprep.MemoryWarning, "420,480"), [str(w.message) for w in record]
    else:
        ours = _run(path, make_config, "kbitprep")

    report = ours["report"]
    dtype_diff = _diff(ref["prepared"], ours["prepared"], 0) + _diff(ref["with_lora"], ours["with_lora"], 0)
    grad_diff = _diff(ref["prepared"], ours["prepared"], 1) + _diff(ref["with_lora"], ours["with_lora"], 1)
    loss_ok = ours["loss"] == pytest.approx(ref["loss"], rel=LOSS_REL, abs=0)
    _ROWS[label] = {
        "backend": label,
        "detected": report.backend,
        "params": str(len(ref["prepared"])),
        "dtype": "match" if not dtype_diff else f"DIFF ({len(dtype_diff)})",
        "requires_grad": "match" if not grad_diff else f"DIFF ({len(grad_diff)})",
        "checkpointing": ("match" if ref["checkpointing"] == ours["checkpointing"] else "DIFF")
        + f" ({'on' if ref['checkpointing'] else 'off'}/{'on' if ours['checkpointing'] else 'off'})",
        "loss peft": f"{ref['loss']:.7f}",
        "loss kbitprep": f"{ours['loss']:.7f}",
        "loss": "match" if loss_ok else "DIFF",
        "use_reentrant": f"{ref['reentrant']}/{ours['reentrant']}",
        "LoRA grads": "{1}/{0} with grad, {2}/4 B!=0 (peft {4}/{3}, {5}/4)".format(*ours["counts"], *ref["counts"]),
    }

    assert report.backend == expected_backend
    assert len(ref["prepared"]) == 21  # the tiny Llama's 21 parameters (cases/README.md)
    assert not dtype_diff, dtype_diff
    assert not grad_diff, grad_diff
    assert ref["checkpointing"] == ours["checkpointing"] == (expected_backend != "none")
    assert report.gradient_checkpointing == ours["checkpointing"]
    if ours["checkpointing"]:
        assert ours["reentrant"] == "False" and report.use_reentrant is False
    assert torch.isfinite(torch.tensor(ours["loss"]))
    assert loss_ok, (ref["loss"], ours["loss"])
    # 8 LoRA tensors, each with a grad, and every lora_B grad non-zero, in both
    assert ours["counts"] == (8, 8, 4)
    assert ref["counts"] == (8, 8, 4)
    for name, g in ref["grads"].items():
        if "lora_B" in name:
            ours_g = ours["grads"][name]
            assert ours_g is not None and g is not None
            torch.testing.assert_close(ours_g, g, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_parity_table_is_complete() -> None:
    """Runs last in this module: every backend that ran has a row, and every row matches."""
    if not _ROWS:
        pytest.skip("no parity test ran in this session")
    table = _format_table()
    assert "DIFF" not in table, "\n" + table
