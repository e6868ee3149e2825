"""DeepSpeed ZeRO-3 scenarios as a script, for ``python -m torch.distributed.run --nproc_per_node 2``.

Usage: ``_deepspeed_launch.py MODEL_DIR OUT_DIR SCENARIO [SCENARIO ...]`` with ``DS_ACCELERATOR=cpu``.
Each rank joins one gloo process group (DeepSpeed's CPU accelerator falls back to gloo without
oneCCL), then runs every scenario in turn: load the tiny Llama, prepare it, attach LoRA r=4 on
q_proj/v_proj, ``deepspeed.initialize`` with ZeRO-3 and a torch AdamW, and train 3 steps on this
rank's half of a global batch of 4 sequences. It writes ``OUT_DIR/rank<R>.pt`` with, per scenario:
the plan (kbitprep scenarios), every parameter's dtype before and after ``deepspeed.initialize``
(for a partitioned parameter, the dtype of its shard ``ds_tensor``), the losses, which LoRA tensors
had a gradient at each step (``deepspeed.utils.safe_get_full_grad``), and the gathered LoRA
weights after the steps; or the error, when the scenario failed. Started by tests/test_deepspeed.py.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

STEPS = 3
LR = 1e-3
PER_RANK = 2
LORA_R = 4


def ds_config(precision: str) -> dict[str, Any]:
    """The ZeRO-3 config of every scenario; ``precision`` is ``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    return {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # a torch AdamW, not DeepSpeed's own
        "steps_per_print": 1000,
    }


# name: (model, preparation, checkpointing, engine precision). Preparations: "kbitprep" is
# prepare(distributed="deepspeed"); "peft" is peft's prepare_model_for_kbit_training; "reentrant" and
# "non-reentrant" are prepare(upcast="none") in the single-process mode with that use_reentrant, to
# measure each checkpointing mode on the engine by itself.
SCENARIOS: dict[str, tuple[str, str, str, str]] = {
    "nf4_kbitprep": ("nf4", "kbitprep", "decision", "bf16"),
    "nf4u8_kbitprep": ("nf4u8", "kbitprep", "decision", "bf16"),
    "bf16_kbitprep": ("bf16", "kbitprep", "decision", "bf16"),
    "nf4_peft": ("nf4", "peft", "peft", "bf16"),
    "nf4_reentrant": ("nf4", "reentrant", "reentrant", "bf16"),
    "nf4_non_reentrant": ("nf4", "non-reentrant", "non-reentrant", "bf16"),
    "bf16_non_reentrant": ("bf16", "non-reentrant", "non-reentrant", "bf16"),
    "bf16_reentrant": ("bf16", "reentrant", "reentrant", "bf16"),
    "nf4_kbitprep_fp32": ("nf4", "kbitprep", "decision", "fp32"),
    "nf4_peft_fp32": ("nf4", "peft", "peft", "fp32"),
    "nf4_non_reentrant_pre_0.19.3": ("nf4", "non-reentrant", "non-reentrant", "bf16"),
    "nf4_reentrant_pre_0.19.3": ("nf4", "reentrant", "reentrant", "bf16"),
}


@contextlib.contextmanager
def _recompute_fix(enabled: bool) -> Iterator[None]:
    """Run a scenario with the recompute fix of DeepSpeed PR #8148 on (the installed 0.19.8) or off
    (DeepSpeed before 0.19.3). The switch is a module global of DeepSpeed's coordinator, shared by
    every engine in this process: it is always put back, so no later scenario (the Trainer's
    included) runs without the fix by accident."""
    coordinator = sys.modules["deepspeed.runtime.zero.partitioned_param_coordinator"]
    assert coordinator.torch is torch, "the recompute fix was left switched off by an earlier scenario"
    if not enabled:
        coordinator.torch = _NoGraphTask()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        coordinator.torch = torch  # type: ignore[attr-defined]


class _NoGraphTaskC:
    """``torch._C`` as seen from a coordinator that cannot tell a backward is running."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch._C, name)

    @staticmethod
    def _current_graph_task_id() -> int:
        return -1


class _NoGraphTask:
    """Stands in for ``torch`` inside DeepSpeed's partitioned_param_coordinator: reports no
    running backward, which turns off the fix of DeepSpeed PR #8148 (first in 0.19.3) that
    keeps frozen parameters gathered during a checkpoint recompute."""

    _C = _NoGraphTaskC()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _engine_dtype(p: torch.nn.Parameter) -> str:
    shard = getattr(p, "ds_tensor", None)
    return str((shard if shard is not None else p).dtype)


def _load(model_dir: str, kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from _quantized import bnb4_config

    extra: dict[str, Any] = {}  # no device_map: transformers refuses one while a ZeRO-3 config is alive
    if kind == "nf4":
        extra["quantization_config"] = bnb4_config(bnb_4bit_quant_storage=torch.bfloat16)
    elif kind == "nf4u8":  # bitsandbytes' default quant_storage, uint8
        extra["quantization_config"] = bnb4_config()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **extra)  # type: ignore[no-any-return]


def _prepare(model: torch.nn.Module, kind: str, how: str, ckpt: str) -> dict[str, Any] | None:
    import kbitprep
    from _models import enable_checkpointing

    if how == "kbitprep":
        if kind == "bf16":  # kbitprep (as peft) leaves checkpointing off on an unquantized model
            enable_checkpointing(model, {"use_reentrant": False})
        return kbitprep.prepare(model, distributed="deepspeed").to_dict()
    if how == "peft":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model)  # peft 0.21's default: use_reentrant=True
        return None
    reentrant = ckpt == "reentrant"
    if kind == "bf16":
        enable_checkpointing(model, {"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    return kbitprep.prepare(model, upcast="none", gradient_checkpointing_kwargs={"use_reentrant": reentrant}).to_dict()


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1234)  # the same adapter on both ranks
    cfg = LoraConfig(
        r=LORA_R, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def _short(name: str) -> str:
    return name.replace("module.", "", 1).replace("base_model.model.", "")


def _lora_grads(engine: Any) -> dict[str, tuple[bool, bool]]:
    """Per LoRA tensor: (has a finite gradient, the gradient is non-zero), after backward.

    A collective under ZeRO-3 (each rank holds a partition): every rank asks for every tensor."""
    from deepspeed.utils import safe_get_full_grad

    seen = {}
    for n, p in engine.module.named_parameters():
        if "lora_" in n:
            g = safe_get_full_grad(p)
            ok = g is not None and bool(torch.isfinite(g).all())
            seen[_short(n)] = (ok, g is not None and bool(g.abs().sum() > 0))
    return seen


def _train(rank: int, engine: Any) -> dict[str, Any]:
    from _models import standard_batch

    ids = standard_batch(batch=2 * PER_RANK)[rank * PER_RANK : (rank + 1) * PER_RANK]
    losses: list[float] = []
    grads: list[dict[str, tuple[bool, bool]]] = []  # per step: name -> (has a finite grad, non-zero)
    for _ in range(STEPS):
        engine.train()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        grads.append(_lora_grads(engine))
        engine.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "grads": grads}


def _gathered_lora(engine: Any) -> dict[str, torch.Tensor]:
    import deepspeed

    lora = [(n, p) for n, p in engine.module.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in lora]):
        return {_short(n): p.detach().float().clone() for n, p in lora}


def run_scenario(rank: int, model_dir: str, name: str) -> dict[str, Any]:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    kind, how, ckpt, precision = SCENARIOS[name]
    # kbitprep reads the config from here, as after TrainingArguments(deepspeed=...); transformers
    # keeps only a weak reference, so hold it until deepspeed.initialize has run
    hf_config = HfDeepSpeedConfig(ds_config(precision)) if how == "kbitprep" else None
    model = _load(model_dir, kind)
    loaded = {n: str(p.dtype) for n, p in model.named_parameters()}
    plan = _prepare(model, kind, how, ckpt)
    model = _lora(model)
    before = {_short(n): str(p.dtype) for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(precision))
    after = {_short(n): _engine_dtype(p) for n, p in engine.module.named_parameters()}
    partitioned = sum(1 for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
    del hf_config
    out: dict[str, Any] = {"plan": plan, "loaded": loaded, "before": before, "after": after}
    out["partitioned"] = partitioned
    try:
        out["start"] = _gathered_lora(engine)
        with _recompute_fix(not name.endswith("pre_0.19.3")):
            out.update(_train(rank, engine))
        out["weights"] = _gathered_lora(engine)
    finally:  # a failed scenario leaves no engine (hooks, gathered parameters) behind
        engine.destroy()
    return out


def run_trainer(rank: int, model_dir: str, out_dir: str) -> dict[str, Any]:
    """The same through transformers' Trainer: TrainingArguments(deepspeed=...) first (it keeps the
    HfDeepSpeedConfig kbitprep reads), then load, prepare with distributed="auto", LoRA, train."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import kbitprep
    from _training import TokenDataset

    config = {**ds_config("bf16"), "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto"}
    config["gradient_accumulation_steps"] = "auto"
    args = TrainingArguments(
        output_dir=str(Path(out_dir) / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=PER_RANK,
        learning_rate=LR,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=config,
    )
    model = _load(model_dir, "nf4")
    loaded = {n: str(p.dtype) for n, p in model.named_parameters()}
    plan = kbitprep.prepare(model, distributed="auto").to_dict()
    model = _lora(model)
    before = {_short(n): str(p.dtype) for n, p in model.named_parameters()}
    record: dict[str, Any] = {"grads": []}
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())

    class Watch(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            engine = trainer.model_wrapped
            record["after"] = {_short(n): _engine_dtype(p) for n, p in engine.module.named_parameters()}
            record["start"] = _gathered_lora(engine)
            real_step = engine.step

            def step(*sa: Any, **skw: Any) -> Any:  # between backward and the optimizer step
                record["grads"].append(_lora_grads(engine))
                return real_step(*sa, **skw)

            engine.step = step

    trainer.add_callback(Watch())
    try:
        trainer.train()
        losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
        weights = _gathered_lora(trainer.model_wrapped)
    finally:
        destroy = getattr(trainer.model_wrapped, "destroy", None)
        if callable(destroy):
            destroy()
    return {"plan": plan, "loaded": loaded, "before": before, "losses": losses, "weights": weights, **record}


def _forget_config() -> None:
    """No scenario sees the DeepSpeed config of the one before. transformers keeps it by weak
    reference, which a reference cycle (TrainingArguments, a failed scenario's traceback) keeps
    alive until collected; a live ZeRO-3 config makes from_pretrained load under zero.Init."""
    from transformers.integrations import deepspeed as hf_ds

    gc.collect()
    hf_ds.unset_hf_deepspeed_config()


def main(model_dir: str, out_dir: str, names: list[str]) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    # the shared-memory op (60-85 s of g++ on first use) is not used here; `import
    # deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm re-exports it)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=180))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.monotonic()
        try:
            results[name] = (
                run_trainer(rank, model_dir, out_dir) if name == "trainer" else run_scenario(rank, model_dir, name)
            )
        except Exception as exc:
            last = traceback.format_exc().strip().splitlines()[-1]
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "where": last}
            print(f"[rank {rank}] {name}: {traceback.format_exc()}", file=sys.stderr, flush=True)
        finally:
            _forget_config()
        coordinator = sys.modules["deepspeed.runtime.zero.partitioned_param_coordinator"]
        results[name]["fix_restored"] = coordinator.torch is torch
        results[name]["seconds"] = time.monotonic() - t0
        losses = results[name].get("losses")
        shown = ", ".join(f"{x:.6f}" for x in losses) if losses else results[name].get("error", "")[:200]
        print(f"[rank {rank}] {name} ({results[name]['seconds']:.1f} s): {shown}", flush=True)
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        results[name]["finite"] = finite
        dist.barrier()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
