"""Distributed (FSDP) mode, proven with torch.distributed: 2 CPU processes, gloo, real FSDP1 and FSDP2.

The model is the tiny Llama loaded with bitsandbytes 4-bit NF4 and
``bnb_4bit_quant_storage=torch.bfloat16``. One spawn of 2 ranks runs every distributed scenario
(FSDP2 with kbitprep, FSDP1 with kbitprep, FSDP1 with peft's preparation) and saves what each rank
saw; the tests below read those records. The plan-level tests run in this process.
"""

from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import kbitprep
from _lora import add_lora
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK, load, saved_tiny, standard_batch
from _plan_warnings import warning_of
from _quantized import bnb4_config
from kbitprep import InvalidArgumentError, KbitPrepError, NotShardableError

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
LR = 1e-3
PER_RANK = 2  # sequences per rank; the global batch is WORLD * PER_RANK
DEADLINE_S = 300
FSDP1_MIXED_DTYPES = "Must flatten tensors with uniform dtype"  # torch 2.13 fsdp/_flat_param.py
FSDP1_INTEGER = "Cannot flatten integer dtype tensors"  # the same file, for uint8 quant_storage


def _global_batch() -> torch.Tensor:
    return standard_batch(batch=WORLD * PER_RANK)


def _load_bf16_storage(path: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return load(path, dtype=dtype, quantization_config=bnb4_config(bnb_4bit_quant_storage=torch.bfloat16))


def _attach_lora(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    torch.manual_seed(1234)  # same adapter init on every rank and in the single-process reference
    model = add_lora(model)
    if dtype is not None:
        kbitprep.cast_adapters(model, dtype)
    return model


def _lora_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def _short(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("base_model.model.", "")


# -- the worker (runs in each spawned rank) --------------------------------------------------


def _prepared_with(path: str, how: str) -> torch.nn.Module:
    model = _load_bf16_storage(path)
    if how == "kbitprep":
        report = kbitprep.prepare(model, distributed="fsdp")
        dtype = report.shard_dtype
        return _attach_lora(model, dtype)
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    return _attach_lora(model, None)


def _fsdp1_grad_coverage(model: torch.nn.Module, numel: dict[str, int]) -> tuple[dict[str, bool], dict[str, bool]]:
    """Whether every element of each LoRA parameter got a gradient on some rank, and whether it is non-zero.

    FSDP1 with use_orig_params gives each rank a view of the part of a parameter its shard holds
    (empty when it holds none), and the grad to match. ``summon_full_params(with_grads=True)``
    would be simpler, but on CPU in torch 2.13 it assigns an fp32 buffer as the grad of the bf16
    flat parameter and raises ("attempting to assign a gradient with dtype 'float'"), so the
    ranks add up what they hold instead.
    """
    import torch.distributed as dist

    names = [_short(n) for n, _ in _lora_params(model)]
    held = torch.zeros(len(names), 2, dtype=torch.float64)  # (elements with a grad, sum of squares)
    for i, (_n, p) in enumerate(_lora_params(model)):
        if p.grad is not None:
            held[i, 0] = p.grad.numel()
            held[i, 1] = p.grad.detach().double().pow(2).sum()
    dist.all_reduce(held)
    seen = {n: int(held[i, 0]) == numel[n] for i, n in enumerate(names)}
    return seen, {n: bool(held[i, 1] > 0) for i, n in enumerate(names)}


def _train(rank: int, model: torch.nn.Module, kind: str, numel: dict[str, int]) -> dict[str, Any]:
    """STEPS AdamW steps on this rank's slice of the global batch; what was seen on the way."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    ids = _global_batch()[rank * PER_RANK : (rank + 1) * PER_RANK]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses: list[float] = []
    grads_seen: list[dict[str, bool]] = []
    nonzero_b: list[int] = []
    for step in range(STEPS):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if kind == "fsdp2":  # each rank holds a DTensor shard of every parameter and of its grad
            seen = {_short(n): p.grad is not None for n, p in _lora_params(model)}
            full = {_short(n): p.grad.full_tensor() for n, p in _lora_params(model) if p.grad is not None}
            nonzero = {n: bool(g.abs().sum() > 0) for n, g in full.items()}
        else:
            seen, nonzero = _fsdp1_grad_coverage(model, numel)
        grads_seen.append(seen)
        nonzero_b.append(sum(1 for n, nz in nonzero.items() if "lora_B" in n and nz))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        print(f"[rank {rank}] {kind} step {step + 1} loss {losses[-1]:.6f}", flush=True)
    if kind == "fsdp2":
        weights = {_short(n): p.full_tensor().detach().float().clone() for n, p in _lora_params(model)}
    else:
        with FSDP.summon_full_params(model):
            weights = {_short(n): p.detach().float().clone() for n, p in _lora_params(model)}
    return {"losses": losses, "grads_seen": grads_seen, "nonzero_b": nonzero_b, "weights": weights}


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.base_model.model.model.layers


def _run_fsdp2(rank: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _prepared_with(path, "kbitprep")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    numel = {_short(n): p.numel() for n, p in _lora_params(model)}
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return {"dtypes": dtypes, **_train(rank, model, "fsdp2", numel)}


def _run_fsdp1(rank: int, path: str, how: str) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _prepared_with(path, how)
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    numel = {_short(n): p.numel() for n, p in _lora_params(model)}
    try:
        wrapped = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    except Exception as exc:
        print(f"[rank {rank}] fsdp1 with {how} preparation: {type(exc).__name__}: {exc}", flush=True)
        return {"dtypes": dtypes, "error": f"{type(exc).__name__}: {exc}"}
    return {"dtypes": dtypes, **_train(rank, wrapped, "fsdp1", numel)}


def _worker(rank: int, path: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=240)
    )
    try:
        results: dict[str, Any] = {}
        t0 = time.monotonic()
        results["fsdp2_kbitprep"] = _run_fsdp2(rank, path)
        results["fsdp1_kbitprep"] = _run_fsdp1(rank, path, "kbitprep")
        results["fsdp1_peft"] = _run_fsdp1(rank, path, "peft")
        results["seconds"] = time.monotonic() - t0
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(model_root: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Spawn WORLD ranks once; each rank's records of every scenario."""
    import torch.multiprocessing as mp

    path = saved_tiny(model_root)
    work = tmp_path_factory.mktemp("dist")
    init_file = work / "pg-init"  # a file rendezvous: no port to collide with other jobs
    start = time.monotonic()
    ctx = mp.start_processes(
        _worker, args=(path, str(init_file), str(work)), nprocs=WORLD, join=False, start_method="spawn"
    )
    while not ctx.join(timeout=5):
        if time.monotonic() - start > DEADLINE_S:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            errors = "\n".join(p.read_text() for p in work.glob("rank*.err"))
            pytest.fail(f"the {WORLD} ranks did not finish within {DEADLINE_S} s\n{errors}")
    out = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    print(f"\n{WORLD} ranks finished in {time.monotonic() - start:.1f} s")
    for name in ("fsdp2_kbitprep", "fsdp1_kbitprep"):
        for r, res in enumerate(out):
            print(f"  {name} rank {r} losses: {', '.join(f'{x:.6f}' for x in res[name]['losses'])}")
    print(f"  fsdp1_peft: {out[0]['fsdp1_peft'].get('error', 'no error')}")
    return out


# -- tests on the 2-process runs ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fsdp2_kbitprep", "fsdp1_kbitprep"])
def test_trains_sharded_across_two_ranks(ranks: list[dict[str, Any]], scenario: str) -> None:
    runs = [r[scenario] for r in ranks]
    for rank, run in enumerate(runs):
        assert "error" not in run, f"rank {rank}: {run.get('error')}"
        assert run["dtypes"] == ["torch.bfloat16"], "the prepared model and its adapters hold one floating dtype"
        assert len(run["losses"]) == STEPS
        assert all(math.isfinite(x) for x in run["losses"]), run["losses"]
        for step, seen in enumerate(run["grads_seen"]):
            assert len(seen) == 8, seen  # q_proj, v_proj x 2 layers x lora_A, lora_B
            assert all(seen.values()), f"rank {rank} step {step + 1}: LoRA parameters without a grad: {seen}"
        assert run["nonzero_b"][0] == 4, "every lora_B gets a non-zero gradient on step 1"
    # the ranks saw different data but hold the same adapter after the sharded optimizer steps
    w0, w1 = runs[0]["weights"], runs[1]["weights"]
    assert w0.keys() == w1.keys() and len(w0) == 8
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        assert torch.isfinite(w0[name]).all(), name
    assert any(bool(w0[n].abs().sum() > 0) for n in w0 if "lora_B" in n), "training moved lora_B away from 0"


@pytest.mark.slow
def test_fsdp1_refuses_peft_preparation(ranks: list[dict[str, Any]]) -> None:
    # peft upcasts norms and embeddings to fp32 beside the bf16-stored 4-bit weights
    for run in (r["fsdp1_peft"] for r in ranks):
        assert run["dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert run.get("error", "").startswith("ValueError: " + FSDP1_MIXED_DTYPES), run


@pytest.mark.slow
def test_single_process_loss_matches_two_rank_mean(ranks: list[dict[str, Any]], model_root: str) -> None:
    model = _load_bf16_storage(saved_tiny(model_root))
    kbitprep.prepare(model, distributed="fsdp")
    model = _attach_lora(model, torch.bfloat16)
    model.train()
    ids = _global_batch()
    with torch.no_grad():
        single = float(model(input_ids=ids, labels=ids).loss)
    print(f"\n  single process, global batch of {WORLD * PER_RANK}: step-1 loss {single:.6f}")
    for scenario in ("fsdp2_kbitprep", "fsdp1_kbitprep"):
        mean = sum(r[scenario]["losses"][0] for r in ranks) / WORLD
        print(f"  {scenario}: mean of the {WORLD} ranks' step-1 losses {mean:.6f}")
        assert mean == pytest.approx(single, rel=1e-3), (scenario, single, mean)


# -- the plan in this process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_storage(model_root: str) -> torch.nn.Module:
    return _load_bf16_storage(saved_tiny(model_root))


def test_plan_keeps_one_dtype(bf16_storage: torch.nn.Module) -> None:
    before = {n: (p.dtype, p.requires_grad) for n, p in bf16_storage.named_parameters()}
    p = kbitprep.plan(bf16_storage, distributed="fsdp")
    assert (p.distributed, p.shard_dtype) == ("fsdp", torch.bfloat16)
    assert p.casts == () and p.bytes_delta == 0
    assert (p.gradient_checkpointing, p.use_reentrant, p.use_cache_off) == (True, False, True)
    assert p.input_grad_hook is ENABLE_ADDS_INPUT_GRAD_HOOK  # transformers 5's enable installs it; kept (C18)
    assert p.warnings == ()
    d = p.to_dict()
    assert d["distributed"] == "fsdp" and d["shard_dtype"] == "torch.bfloat16"
    json.dumps(d)
    assert "distributed: fsdp" in str(p)
    assert {n: (q.dtype, q.requires_grad) for n, q in bf16_storage.named_parameters()} == before
    # the default stays peft's single-process behaviour (C06: 7 upcasts)
    default = kbitprep.plan(bf16_storage)
    assert default.distributed is None and default.shard_dtype is None and len(default.casts) == 7
    assert kbitprep.plan(bf16_storage, distributed="auto").to_dict() == default.to_dict()


def test_prepare_then_cast_adapters(model_root: str) -> None:
    model = _load_bf16_storage(saved_tiny(model_root))
    model.config.use_cache = True
    report = kbitprep.prepare(model, distributed="fsdp")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.use_cache is False
    model = add_lora(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # peft's default
    cast = kbitprep.cast_adapters(model, torch.bfloat16)
    assert len(cast) == 8 and all("lora_" in n for n in cast)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert kbitprep.cast_adapters(model, torch.bfloat16) == ()
    report.undo()
    assert model.base_model.model.config.use_cache is True


def test_model_dtype_differs_from_storage(model_root: str) -> None:
    # float32 norms and embeddings beside bf16 storage: cast down to the storage dtype
    model = _load_bf16_storage(saved_tiny(model_root), dtype=torch.float32)
    p = kbitprep.plan(model, distributed="fsdp")
    assert p.shard_dtype == torch.bfloat16
    assert len(p.casts) == 7 and {(c.from_dtype, c.to_dtype) for c in p.casts} == {(torch.float32, torch.bfloat16)}
    assert p.bytes_delta < 0
    # true for this model: fp32 inputs_embeds (its loaded dtype) would reach the now-bf16 norm,
    # which returns fp32 into the bf16 projections
    with pytest.warns(kbitprep.PrecisionWarning, match="inputs_embeds"):
        kbitprep.prepare(model, distributed="fsdp")
    assert {q.dtype for q in model.parameters()} == {torch.bfloat16}


def test_integer_storage_warns(model_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())  # quant_storage uint8
    p = kbitprep.plan(model, distributed="fsdp")
    assert p.distributed == "fsdp" and p.shard_dtype == torch.bfloat16 and p.casts == ()
    assert "torch.uint8" in warning_of(p, "distributed", FSDP1_INTEGER)
    # auto with an FSDP launch: integer storage leaves the mode off, and says so
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    auto = kbitprep.plan(model, distributed="auto")
    assert auto.distributed is None and len(auto.casts) == 7
    warning_of(auto, "distributed", "stays off")


def test_auto_follows_accelerate_fsdp_launch(bf16_storage: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    p = kbitprep.plan(bf16_storage, distributed="auto")
    assert (p.distributed, p.shard_dtype, p.casts) == ("fsdp", torch.bfloat16, ())
    warning_of(p, "distributed", "ACCELERATE_USE_FSDP")


def test_refuses_what_fsdp_cannot_shard(model_root: str) -> None:
    from transformers import BitsAndBytesConfig

    model = load(saved_tiny(model_root), quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(NotShardableError, match="Int8Params.SCB") as info:
        kbitprep.prepare(model, distributed="fsdp")
    assert isinstance(info.value, KbitPrepError) and isinstance(info.value, ValueError)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distributed": "ddp"}, "distributed must be"),
        ({"distributed": "fsdp", "upcast": "all"}, "cannot be combined"),
        (
            {"distributed": "fsdp", "gradient_checkpointing_kwargs": {"use_reentrant": True}},
            # what was found, what FSDP needs, and the fix
            r"use_reentrant=True cannot be combined with distributed='fsdp', which needs use_reentrant=False\. "
            r"Pass gradient_checkpointing_kwargs=\{'use_reentrant': False\} or leave it out",
        ),
    ],
)
def test_conflicting_options(bf16_storage: torch.nn.Module, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        kbitprep.plan(bf16_storage, **kwargs)


def test_cast_adapters_arguments(bf16_storage: torch.nn.Module) -> None:
    with pytest.raises(InvalidArgumentError):
        kbitprep.cast_adapters(bf16_storage, torch.int8)
    with pytest.warns(kbitprep.AdapterWarning, match="no adapter parameters"):
        assert kbitprep.cast_adapters(bf16_storage, torch.bfloat16) == ()
