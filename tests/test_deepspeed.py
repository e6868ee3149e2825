"""DeepSpeed mode, proven on the real engine: 2 CPU ranks, ZeRO-3, DeepSpeed 0.19.8 over gloo.

One ``torch.distributed.run`` launch of tests/_deepspeed_launch.py runs every scenario on 2 ranks
(the tiny Llama in bf16 and with bitsandbytes 4-bit NF4, LoRA r=4 on q_proj/v_proj, ZeRO-3 with
``stage3_param_persistence_threshold: 0`` so every parameter is partitioned, 3 AdamW steps) and
saves what each rank saw; the tests below read those records. The plan-level tests run in this
process. The launch prints the per-rank losses and the plan-vs-engine dtype table (``pytest -s``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kbitprep
from _models import load, saved_tiny, standard_batch
from _plan_warnings import has_warning, warning_of
from _quantized import bnb4_config
from kbitprep import InvalidArgumentError, KbitPrepError, NotShardableError
from kbitprep.steps import distributed as _distributed

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
PER_RANK = 2
DEADLINE_S = 420
CHECKPOINT_ERROR = "Recomputed values for the following tensors have different metadata"  # torch 2.13 checkpoint.py
KBITPREP = ("nf4_kbitprep", "nf4u8_kbitprep", "bf16_kbitprep", "nf4_kbitprep_fp32")
TRAINED = (*KBITPREP, "nf4_peft", "nf4_peft_fp32", "nf4_reentrant", "nf4_reentrant_pre_0.19.3")
# the scenario that fails runs first: whatever it leaves behind would show in every later one
LAUNCHED = ("nf4_non_reentrant_pre_0.19.3", *TRAINED, "trainer")
ZERO3_NOTE = "so both modes train"  # the plan's note on ZeRO-3 checkpointing with DeepSpeed >= 0.19.3

pytest.importorskip("deepspeed", reason="deepspeed is in the test group (pip install deepspeed==0.19.8)")


@pytest.fixture(scope="module")
def ranks(model_root: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Launch WORLD ranks once; each rank's record of every scenario."""
    path = saved_tiny(model_root)
    work = tmp_path_factory.mktemp("deepspeed")
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator; gloo, as oneCCL is not installed
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(work / "extensions"),  # stays empty: the launch skips the shm op build
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    cmd += [str(tests / "_deepspeed_launch.py"), path, str(work), *LAUNCHED]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert not any((work / "extensions").glob("**/*.so")), "the shared-memory op was compiled after all"
    print(f"\n{WORLD} ranks ran {len(LAUNCHED)} scenarios in {time.monotonic() - start:.1f} s")
    for name in LAUNCHED:
        for r, res in enumerate(out):
            got = res[name].get("losses") or res[name].get("error", "")[:120]
            shown = ", ".join(f"{x:.6f}" for x in got) if isinstance(got, list) else got
            print(f"  {name} rank {r}: {shown}")
    print(_dtype_table(out[0]))
    return out


# -- the plan's prediction, worked out from the plan alone ----------------------------------------


def _predicted(record: dict[str, Any]) -> dict[str, str]:
    """Each parameter's dtype after deepspeed.initialize, worked out from the plan alone.

    Base parameters start at the dtype they were loaded in, then take the plan's casts. LoRA
    parameters start at the dtype peft created them in (float32, checked in
    test_expected_engine_dtypes). Then the plan's ``shard_dtype``, when set, is what the engine
    converts every floating parameter to, except that on a model partitioned by zero.Init (the plan
    says so) the adapters keep their own dtype; with no ``shard_dtype`` the engine keeps every dtype.
    """
    plan = record["plan"]
    shard = plan["shard_dtype"]
    zero_init = has_warning(plan, "distributed", "zero.Init")
    cast = {n: c["to_dtype"] for c in plan["casts"] for n in (c["name"], *c.get("tied", ()))}
    out = {}
    for name in record["before"]:
        if "lora_" in name:
            dtype = record["before"][name]
        else:
            base = name.replace(".base_layer", "")
            dtype = cast.get(base, record["loaded"][base])
        floating = getattr(torch, dtype.removeprefix("torch.")).is_floating_point
        adapter_kept = zero_init and "lora_" in name
        out[name] = shard if shard is not None and floating and not adapter_kept else dtype
    return out


def _dtype_table(rank0: dict[str, Any]) -> str:
    """Rows: parameter kind; columns: each kbitprep scenario's plan -> engine, and peft's."""
    lines = ["  plan-vs-engine dtypes (rank 0; engine = the shard's dtype after deepspeed.initialize):"]
    sample = rank0["nf4_kbitprep"]["before"]
    picks = [
        n
        for n in sample
        if n.startswith(("model.embed", "model.norm", "lm_head")) or ".layers.0." in n and "v_proj" not in n
    ]
    names = [*KBITPREP, "trainer"]
    head = f"    {'parameter':58} " + " ".join(f"{s:>27}" for s in (*names, "nf4_peft"))
    lines.append(head)
    for n in picks:
        cells = []
        for s in names:
            rec = rank0[s]
            cells.append(f"{_short_dtype(_predicted(rec)[n])}->{_short_dtype(rec['after'][n])}")
        peft = rank0["nf4_peft"]
        cells.append(f"{_short_dtype(peft['before'][n])}->{_short_dtype(peft['after'][n])}")
        lines.append(f"    {n:58} " + " ".join(f"{c:>27}" for c in cells))
    lines.append("    (kbitprep columns: plan prediction -> engine; nf4_peft: dtype peft prepared -> engine)")
    return "\n".join(lines)


def _short_dtype(dtype: str) -> str:
    return dtype.removeprefix("torch.")


# -- tests on the 2-rank runs -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scenario", TRAINED + ("trainer",))
def test_trains_under_zero3(ranks: list[dict[str, Any]], scenario: str) -> None:
    runs = [r[scenario] for r in ranks]
    for rank, run in enumerate(runs):
        assert "error" not in run, f"rank {rank}: {run.get('error')}"
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"]), run["losses"]
        assert len(run["grads"]) == STEPS
        for step, seen in enumerate(run["grads"]):
            assert len(seen) == 8, seen  # q_proj, v_proj x 2 layers x lora_A, lora_B
            assert all(ok for ok, _ in seen.values()), f"rank {rank} step {step + 1}: LoRA tensors without a grad"
        first = run["grads"][0]
        assert all(nz for n, (_, nz) in first.items() if "lora_B" in n), "every lora_B has a non-zero step-1 grad"
        assert all(nz for _, nz in run["grads"][1].values()), "every LoRA tensor has a non-zero step-2 grad"
    w0, w1 = runs[0]["weights"], runs[1]["weights"]
    assert w0.keys() == w1.keys() and len(w0) == 8
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} differs across ranks"
        assert not torch.equal(w0[name], runs[0]["start"][name]), f"{name} did not move"


def _peft_upcasts(ranks: list[dict[str, Any]]) -> set[str]:
    """What peft's own prepare upcast to float32 (its record, independent of kbitprep's plan)."""
    before = ranks[0]["nf4_peft"]["before"]
    return {n for n, d in before.items() if d == "torch.float32" and "lora_" not in n}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [*KBITPREP, "trainer"])
def test_engine_dtypes_match_plan(ranks: list[dict[str, Any]], scenario: str) -> None:
    for run in (r[scenario] for r in ranks):
        plan = run["plan"]
        assert plan["distributed"] == "deepspeed"
        if plan["shard_dtype"] is None:  # no bf16/fp16: the engine keeps dtypes, so peft's upcast is kept
            assert {c["name"] for c in plan["casts"]} == _peft_upcasts(ranks)
            assert {(c["from_dtype"], c["to_dtype"]) for c in plan["casts"]} == {("torch.bfloat16", "torch.float32")}
            assert plan["bytes_delta"] == sum(c["bytes_after"] - c["bytes_before"] for c in plan["casts"]) > 0
        else:  # the engine converts every floating parameter: a cast would be undone, so none is spent
            assert plan["casts"] == [] and plan["bytes_delta"] == 0
        predicted = _predicted(run)
        assert len(predicted) == 29 and predicted.keys() == run["after"].keys()
        wrong = {n: (predicted[n], run["after"][n]) for n in predicted if predicted[n] != run["after"][n]}
        assert wrong == {}, wrong


@pytest.mark.slow
def test_expected_engine_dtypes(ranks: list[dict[str, Any]]) -> None:
    """The engine's dtypes, written out from DeepSpeed 0.19.8's cast rule (engine.py)."""
    rank0 = ranks[0]
    bf16 = "torch.bfloat16"
    assert set(rank0["nf4_kbitprep"]["after"].values()) == {bf16}  # LoRA created in fp32, converted
    u8 = rank0["nf4u8_kbitprep"]["after"]
    assert {n for n, d in u8.items() if d == "torch.uint8"} == {
        n for n in u8 if "proj.weight" in n or "base_layer" in n
    }
    assert {d for d in u8.values()} == {bf16, "torch.uint8"}
    for name in (*KBITPREP, "trainer", "nf4_peft", "nf4_peft_fp32"):  # peft creates LoRA in float32
        assert {d for n, d in rank0[name]["before"].items() if "lora_" in n} == {"torch.float32"}, name
    fp32 = rank0["nf4_kbitprep_fp32"]  # neither bf16 nor fp16: nothing converted, LoRA stays fp32
    assert fp32["plan"]["shard_dtype"] is None and fp32["after"] == fp32["before"]
    assert fp32["after"] == rank0["nf4_peft_fp32"]["after"]  # the same dtypes as peft's prepare
    assert {fp32["after"][n] for n in fp32["after"] if "lora_" in n} == {"torch.float32"}
    zero_init = rank0["bf16_kbitprep"]  # loaded under zero.Init: the engine skips its cast
    warning_of(zero_init["plan"], "distributed", "zero.Init")
    assert {n for n, d in zero_init["after"].items() if d == "torch.float32"} == {
        n for n in zero_init["after"] if "lora_" in n
    }


@pytest.mark.slow
def test_engine_undoes_peft_upcast(ranks: list[dict[str, Any]]) -> None:
    # peft upcasts norms, embeddings and lm_head to fp32; DeepSpeed's bf16 mode converts them back
    run = ranks[0]["nf4_peft"]
    upcast = {n for n, d in run["before"].items() if d == "torch.float32" and "lora_" not in n}
    assert len(upcast) == 7, upcast
    assert {run["after"][n] for n in upcast} == {"torch.bfloat16"}
    # without bf16 or fp16, the engine keeps them
    assert {ranks[0]["nf4_peft_fp32"]["after"][n] for n in upcast} == {"torch.float32"}


@pytest.mark.slow
def test_checkpointing_modes(ranks: list[dict[str, Any]]) -> None:
    """Non-reentrant (kbitprep's default) trains on DeepSpeed 0.19.8; with the recompute fix of
    DeepSpeed PR #8148 switched off (DeepSpeed before 0.19.3) it fails, and reentrant trains."""
    for run in (r["nf4_kbitprep"] for r in ranks):
        assert run["plan"]["use_reentrant"] is False and run["plan"]["gradient_checkpointing"] is True
    for run in (r[s] for r in ranks for s in (*KBITPREP, "trainer")):  # the plan says why
        warning_of(run["plan"], "distributed", ZERO3_NOTE)
    for run in (r["trainer"] for r in ranks):
        assert run["plan"]["use_reentrant"] is False
    for run in (r["nf4_non_reentrant_pre_0.19.3"] for r in ranks):
        assert run.get("error", "").startswith("CheckpointError"), run
        assert CHECKPOINT_ERROR in run["error"] and "torch.Size([0])" in run["error"], run["error"]
    # every way through gives the same losses: checkpointing changes no number
    ref = [r["nf4_kbitprep"]["losses"] for r in ranks]
    for scenario in ("nf4_reentrant", "nf4_reentrant_pre_0.19.3"):
        assert [r[scenario]["losses"] for r in ranks] == ref, scenario


@pytest.mark.slow
def test_scenarios_leave_nothing_behind(ranks: list[dict[str, Any]]) -> None:
    """The failing scenario runs first; the switch it turns off in DeepSpeed (a module global) is
    back on after every scenario, so each one runs on the engine as installed."""
    for rank, res in enumerate(ranks):
        assert {name: res[name]["fix_restored"] for name in LAUNCHED} == dict.fromkeys(LAUNCHED, True), rank
        assert res[LAUNCHED[0]].get("error", "").startswith("CheckpointError"), rank


@pytest.mark.slow
def test_step1_loss_matches_one_process(ranks: list[dict[str, Any]], model_root: str) -> None:
    # before the first step the adapter is a no-op (lora_B = 0): each rank's step-1 loss is the
    # base model's loss on that rank's half of the global batch
    model = load(saved_tiny(model_root), quantization_config=bnb4_config(bnb_4bit_quant_storage=torch.bfloat16))
    ids = standard_batch(batch=WORLD * PER_RANK)
    for rank in range(WORLD):
        part = ids[rank * PER_RANK : (rank + 1) * PER_RANK]
        with torch.no_grad():
            single = float(model(input_ids=part, labels=part).loss)
        assert ranks[rank]["nf4_kbitprep"]["losses"][0] == pytest.approx(single, rel=1e-3), rank


# -- the plan in this process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def nf4(model_root: str) -> torch.nn.Module:
    return load(saved_tiny(model_root), quantization_config=bnb4_config(bnb_4bit_quant_storage=torch.bfloat16))


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    return monkeypatch


@pytest.fixture
def hf_config() -> Iterator[Any]:
    """Build transformers' HfDeepSpeedConfig from a dict; unset it afterwards (it is process-wide)."""
    from transformers.integrations import deepspeed as hf_ds

    held: list[Any] = []

    def make(config: dict[str, Any]) -> Any:
        held.append(hf_ds.HfDeepSpeedConfig(config))
        return held[-1]

    yield make
    held.clear()
    hf_ds.unset_hf_deepspeed_config()


def _zero3(precision: str) -> dict[str, Any]:
    return {
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }


def test_accelerate_environment(nf4: torch.nn.Module, no_launch: pytest.MonkeyPatch) -> None:
    before = {n: (p.dtype, p.requires_grad) for n, p in nf4.named_parameters()}
    assert kbitprep.plan(nf4, distributed="auto").distributed is None  # no launch: off
    no_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    no_launch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    p = kbitprep.plan(nf4, distributed="auto")
    assert (p.distributed, p.shard_dtype, p.casts, p.bytes_delta, p.use_reentrant) == (
        "deepspeed",
        torch.bfloat16,
        (),
        0,
        False,
    )
    assert "ZeRO stage 3" in warning_of(p, "distributed", "ACCELERATE_USE_DEEPSPEED")
    assert "distributed: deepspeed" in str(p) and json.dumps(p.to_dict())
    no_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # stage 2: auto stays off and says why
    off = kbitprep.plan(nf4, distributed="auto")
    assert off.distributed is None and len(off.casts) == 7
    warning_of(off, "distributed", "ZeRO stage 2, not 3")
    assert {n: (q.dtype, q.requires_grad) for n, q in nf4.named_parameters()} == before


def test_config_file_and_auto_precision(nf4: torch.nn.Module, no_launch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    no_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    no_launch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert kbitprep.plan(nf4, distributed="auto").shard_dtype == torch.bfloat16
    # bf16 'auto' resolved to fp16: the engine would convert the bf16-packed 4-bit bytes as numbers
    no_launch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    before = {n: (p.dtype, p.requires_grad) for n, p in nf4.named_parameters()}
    with pytest.raises(NotShardableError, match="converted as numbers") as info:
        kbitprep.prepare(nf4, distributed="deepspeed")
    assert isinstance(info.value, KbitPrepError) and "torch.float16" in str(info.value)
    assert {n: (p.dtype, p.requires_grad) for n, p in nf4.named_parameters()} == before
    no_launch.delenv("ACCELERATE_MIXED_PRECISION")  # 'auto' with nothing to resolve it: an assumption, said
    p = kbitprep.plan(nf4, distributed="deepspeed")
    assert p.shard_dtype == torch.bfloat16
    warning_of(p, "distributed", "leaves bf16/fp16 at 'auto'")


def test_transformers_config(nf4: torch.nn.Module, no_launch: pytest.MonkeyPatch, hf_config: Any) -> None:
    hf_config(_zero3("bf16"))
    p = kbitprep.plan(nf4, distributed="auto")
    assert (p.distributed, p.shard_dtype, p.casts) == ("deepspeed", torch.bfloat16, ())
    warning_of(p, "distributed", "HfDeepSpeedConfig")
    hf_config(_zero3("fp32"))  # the newest HfDeepSpeedConfig is the one transformers reads
    p = kbitprep.plan(nf4, distributed="deepspeed")
    # neither bf16 nor fp16: the engine keeps every dtype, so peft's fp32 upcast stays (7 casts, as C06)
    assert (p.distributed, p.shard_dtype) == ("deepspeed", None)
    assert p.casts == kbitprep.plan(nf4).casts and len(p.casts) == 7
    assert {(c.from_dtype, c.to_dtype) for c in p.casts} == {(torch.bfloat16, torch.float32)}


def test_no_config_is_an_assumption(nf4: torch.nn.Module, no_launch: pytest.MonkeyPatch) -> None:
    p = kbitprep.plan(nf4, distributed="deepspeed")
    assert (p.distributed, p.shard_dtype, p.casts, p.use_reentrant) == ("deepspeed", torch.bfloat16, (), False)
    warning_of(p, "distributed", "no DeepSpeed config was found")
    assert kbitprep.plan(nf4, distributed="auto").distributed is None


def test_decision_fields(nf4: torch.nn.Module, no_launch: pytest.MonkeyPatch, hf_config: Any) -> None:
    from kbitprep import get_backend

    storage = [p for n, p in nf4.named_parameters() if "proj" in n]
    floating = [p for n, p in nf4.named_parameters() if "proj" not in n]
    assert len(storage) == 14 and len(floating) == 7
    strategy = get_backend("bitsandbytes")
    hf_config(_zero3("bf16"))
    found: list[str] = []
    d = _distributed.resolve("deepspeed", strategy, nf4, storage, floating, found)
    assert d == _distributed.DistributedDecision("deepspeed", torch.bfloat16, False, None, False)
    assert len(found) == 1 and ZERO3_NOTE in found[0] and "use_reentrant" in found[0], found
    found.clear()
    hf_config(_zero3("fp32"))
    d = _distributed.resolve("deepspeed", strategy, nf4, storage, floating, found)
    assert d == _distributed.DistributedDecision("deepspeed", None, False, None, True)
    assert len(found) == 1 and ZERO3_NOTE in found[0], found


def test_old_deepspeed_forces_reentrant(nf4: torch.nn.Module, no_launch: pytest.MonkeyPatch) -> None:
    no_launch.setattr(_distributed, "_installed_deepspeed", lambda: (0, 19, 2))
    p = kbitprep.plan(nf4, distributed="deepspeed")
    assert (p.use_reentrant, p.gradient_checkpointing, p.input_grad_hook) == (True, True, True)
    warning_of(p, "distributed", "DeepSpeed 0.19.2; before 0.19.3")
    assert not has_warning(p, "distributed", ZERO3_NOTE), p.warnings
    with pytest.raises(InvalidArgumentError, match="use_reentrant=False cannot be combined with .*use_reentrant=True"):
        kbitprep.plan(nf4, distributed="deepspeed", gradient_checkpointing_kwargs={"use_reentrant": False})
    no_launch.setattr(_distributed, "_installed_deepspeed", lambda: None)  # cannot tell: the safe mode
    p = kbitprep.plan(nf4, distributed="deepspeed")
    assert p.use_reentrant is True
    warning_of(p, "distributed", "DeepSpeed is not installed")
    no_launch.setattr(_distributed, "_installed_deepspeed", lambda: (0, 19, 3))
    p = kbitprep.plan(nf4, distributed="deepspeed")
    assert p.use_reentrant is False
    assert "DeepSpeed 0.19.3" in warning_of(p, "distributed", ZERO3_NOTE)
    assert kbitprep.plan(
        nf4, distributed="deepspeed", gradient_checkpointing_kwargs={"use_reentrant": True}
    ).use_reentrant


def test_refuses_what_zero3_cannot_partition(model_root: str, no_launch: pytest.MonkeyPatch) -> None:
    from transformers import BitsAndBytesConfig

    model = load(saved_tiny(model_root), quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(NotShardableError, match="ZeRO-3 partitions every parameter"):
        kbitprep.plan(model, distributed="deepspeed")
    with pytest.raises(InvalidArgumentError, match="'deepspeed'"):
        kbitprep.plan(model, distributed="zero3")
