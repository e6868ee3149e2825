"""``kbitprep.estimate``: the peak memory of a QLoRA training step, predicted from a config."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from kbitprep._errors import BackendUnavailableError, InvalidArgumentError, InvalidModelError
from kbitprep._estimate import _build
from kbitprep._estimate._result import MemoryEstimate
from kbitprep._estimate._step import LOSS_BACKWARD, OPTIMIZER, train_step
from kbitprep._estimate._trace import (
    LiveBytes,
    PhaseStat,
    SdpaRouting,
    bitsandbytes_caches,
    bitsandbytes_device,
    bitsandbytes_transient,
    shadowed_meta,
)
from kbitprep._hf import unwrap_model
from kbitprep._options import PrepareOptions

__all__ = ["estimate", "measure_step"]

logger = logging.getLogger(__name__)

DEVICES = ("cuda", "cpu")
# options of plan() that estimate cannot model on the meta device
_NOT_MODELLED = {
    "distributed": "a sharded run splits the weights over processes",
    "activation_offload": "offloaded activations leave the device at run time",
}


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int (e.g. {name}=4); got {value!r}.")
    return value


def _check_options(options: Mapping[str, Any]) -> tuple[bool, Any, dict[str, Any]]:
    known = set(PrepareOptions.__annotations__) | {"use_gradient_checkpointing", "gradient_checkpointing_kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgumentError(
            f"Unknown option(s) {unknown}; estimate takes batch_size, seq_len, adapter, optimizer, "
            f"quantization_config, device and the options of kbitprep.plan: {sorted(known)}."
        )
    for name, why in _NOT_MODELLED.items():
        value = options.get(name)
        if value not in (None, False):
            raise InvalidArgumentError(
                f"{name}={value!r} is not modelled by kbitprep.estimate ({why}); leave it out to estimate "
                "the step without it."
            )
    rest = dict(options)
    use_gc = rest.pop("use_gradient_checkpointing", True)
    gc_kwargs = rest.pop("gradient_checkpointing_kwargs", None)
    return use_gc, gc_kwargs, rest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Library warnings and log lines raised while building and tracing the meta copy (peft's
    and transformers' deprecation notes, bitsandbytes' dtype notices on every call) are not the
    caller's: the estimate's notes carry what matters."""
    noisy = [logging.getLogger(n) for n in ("bitsandbytes", "peft", "transformers")]
    levels = [lg.level for lg in noisy]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(noisy, levels, strict=True):
                lg.setLevel(level)


def _describe_quantization(qc: Any) -> str:
    method = _build.method_of(qc)
    if method is None:
        return "unquantized"
    if method in ("gptq", "awq"):
        return f"{method.upper()} {qc.bits}-bit, group size {qc.group_size} (gptqmodel layers)"
    if method == "torchao":
        return f"torchao {type(qc.get_apply_tensor_subclass()).__name__}"
    if qc.load_in_8bit:
        return f"bitsandbytes LLM.int8 (threshold {qc.llm_int8_threshold:g})"
    dq = ", double quant" if qc.bnb_4bit_use_double_quant else ""
    compute = str(qc.bnb_4bit_compute_dtype).removeprefix("torch.")
    return f"bitsandbytes {qc.bnb_4bit_quant_type} (compute {compute}{dq})"


def _describe_checkpointing(plan: Any) -> str:
    if not plan.gradient_checkpointing:
        return "off"
    n = plan.checkpoint_every_n_layers
    layout = "every block" if n == 1 else f"every {_ordinal(n)} block"
    if plan.checkpoint_trainable_blocks_only:
        layout += " holding trainable parameters"
    return layout


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _require(module: str, hint: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BackendUnavailableError(
            f"kbitprep.estimate needs {module}, which is not installed. Install it with `{hint}`.",
            install_hint=hint,
        )


def estimate(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    adapter: Any = None,
    optimizer: str = "adamw",
    quantization_config: Any = None,
    device: str = "cuda",
    **prepare_options: Any,
) -> MemoryEstimate:
    """Predict the peak memory of one QLoRA training step before any weight is loaded.

    The model is copied onto the meta device (no weight memory), quantized as transformers
    5.24 ``from_pretrained`` would quantize it, prepared with kbitprep's own planner and the
    given options (casts, freezing, checkpointing layout), given the adapter by peft, and one
    steady-state training step (``loss = model(**batch).loss``, ``loss.backward()``,
    ``optimizer.step()``, ``optimizer.zero_grad()``, after one untracked step that creates the
    optimizer states) is traced with a live-storage tracker. Every operator allocates a meta
    tensor of the size the real one would have, so the peak is exact wherever the traced code
    is the code that runs; see docs/estimate.md for what is assumed and what is not modelled.

    Args:
        model: A transformers model. Best built on the meta device from a config
            (``with torch.device("meta"): AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)``);
            the parameters' dtype is the checkpoint dtype the weights would be loaded in. A model
            with real weights is rebuilt on the meta device from its config (its ``config.dtype``).
            A ``peft.PeftModel`` is looked through; its adapter config is used when ``adapter`` is
            None.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence (also the label length of an encoder-decoder; a Llava-style
            model's sequences open with one image's tokens).
        adapter: A peft config, e.g. ``LoraConfig(r=16, target_modules="all-linear")``
            (``modules_to_save`` copies are trained too). None: the ``PeftModel``'s own config, else
            peft's ``LoraConfig()`` defaults (r=8, the architecture's default target modules).
        optimizer: ``"adamw"`` (``torch.optim.AdamW``), ``"adamw_8bit"``
            (``bitsandbytes.optim.AdamW8bit``) or ``"sgd"`` (no state).
        quantization_config: A transformers quantization config or its dict:
            ``BitsAndBytesConfig`` (4-bit nf4/fp4 with compute dtype and double quantization, or
            ``load_in_8bit``), ``GPTQConfig`` / ``AwqConfig`` (bits and group size; the gptqmodel
            layers a pre-quantized checkpoint loads into), or ``TorchAoConfig`` with one config
            for every linear layer (e.g. ``Int8WeightOnlyConfig()``). None: the model config's
            ``quantization_config``, else the model is estimated unquantized.
        device: The device type to predict for: ``"cuda"`` (default) or ``"cpu"``. It picks the
            attention kernel PyTorch would (flash / memory-efficient / math) and bitsandbytes'
            LLM.int8 training path.
        **prepare_options: The options of :func:`kbitprep.plan`: ``use_gradient_checkpointing``,
            ``gradient_checkpointing_kwargs``, ``upcast``, ``upcast_dtype``,
            ``keep_in_low_precision``, ``checkpoint_every_n_layers``,
            ``checkpoint_trainable_blocks_only``, ``backend``.

    Returns:
        The estimate: ``peak_bytes``, ``peak_at`` and the parts, in bytes.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module``.
        InvalidArgumentError: ``batch_size`` / ``seq_len`` not positive ints, an unknown
            ``optimizer`` or ``device``, an ``adapter`` that is not a peft config (or that peft
            cannot attach), a ``quantization_config`` of another method, an unknown or
            unmodelled option (``distributed``, ``activation_offload``), or an invalid option value
            (as :func:`kbitprep.plan` raises it).
        BackendUnavailableError: transformers, peft or the quantization's library is not
            installed (bitsandbytes for bitsandbytes and ``adamw_8bit``, gptqmodel (and optimum)
            for GPTQ / AWQ, torchao).
        NotTrainableError: The backend says adapters on this model cannot train.
    """
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"Expected a torch.nn.Module (e.g. built on the meta device with AutoModelForCausalLM.from_config); "
            f"got {type(model).__name__}."
        )
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    if optimizer not in _build.OPTIMIZERS:
        raise InvalidArgumentError(f"optimizer must be one of {list(_build.OPTIMIZERS)}; got {optimizer!r}.")
    if device not in DEVICES:
        raise InvalidArgumentError(f"device must be one of {list(DEVICES)}; got {device!r}.")
    use_gc, gc_kwargs, options = _check_options(prepare_options)
    _require("transformers", "pip install 'kbitprep[transformers]'")
    _require("peft", "pip install peft")
    if optimizer == "adamw_8bit":
        _require("bitsandbytes", "pip install 'kbitprep[bnb]'")
    if adapter is None:
        adapter = _peft_config_of(model)
    with _quiet(), bitsandbytes_caches():
        work, qc = _meta_model(model, quantization_config)
        try:
            plan = _prepare_meta(work, use_gc, gc_kwargs, options)
            trained = _build.attach_adapter(work, adapter)
            params = _build.trainable(trained)
            if not params:
                raise InvalidArgumentError(
                    "The adapter left no parameter trainable, so there is no training step to estimate; check "
                    "the adapter's target_modules."
                )
            opt = _build.make_optimizer(params, optimizer, device)
            real_batch = _build.example_batch(trained, batch_size, seq_len)
            tracker = _trace(trained, real_batch, opt, device, adapter)
            return _result(tracker, trained, params, opt, plan, qc, (batch_size, seq_len, device, optimizer), model)
        finally:
            _forget_undo_log(work)


def _forget_undo_log(work: nn.Module) -> None:
    """Drop the undo log ``prepare``'s apply step registered for the meta copy: its entries
    refer to the copy, which would keep it alive in the weak registry for good."""
    from kbitprep import _plan

    stacks = getattr(_plan, "_LOG_STACKS", None)
    if stacks is not None:
        stacks.pop(work, None)


def _peft_config_of(model: nn.Module) -> Any:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and configs:
        return next(iter(configs.values()))
    return None


def _meta_model(model: nn.Module, quantization_config: Any) -> tuple[nn.Module, Any]:
    described = quantization_config
    if described is None:
        described = getattr(getattr(unwrap_model(model), "config", None), "quantization_config", None)
    method = _build.method_of(described)  # raises first for a method the estimate does not build
    if method is not None:
        _require(*_build.METHODS[method])
        if method == "gptq":
            _require("optimum", "pip install optimum")
    return _build.meta_working_copy(model, quantization_config)


def _prepare_meta(work: nn.Module, use_gc: Any, gc_kwargs: Any, options: dict[str, Any]) -> Any:
    """kbitprep's own plan (which accepts a meta-device model) and apply steps on the meta copy
    (``prepare`` refuses meta parameters, since it needs data; the apply steps only change
    flags, dtypes of meta tensors and hooks)."""
    from kbitprep._prepare import plan
    from kbitprep.steps.run import apply_steps

    p = plan(work, use_gc, gc_kwargs, **options)
    apply_steps(work, p)
    return p


def _trace(
    model: nn.Module, real_batch: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, device: str, adapter: Any
) -> LiveBytes:
    with SdpaRouting(device), bitsandbytes_device(device):
        warmup = LiveBytes(meta=True)
        if getattr(adapter, "modules_to_save", None):
            # kbitprep casts a modules_to_save copy at its first forward, before any optimizer
            # step sees it: one forward first, as the first training step would
            with warmup, torch.no_grad():
                model.train()
                model(**{k: shadowed_meta(v) for k, v in real_batch.items()})
        _build.prime_optimizer(opt)  # the states a first step creates
        tracker = LiveBytes(meta=True, transient=bitsandbytes_transient)
        for kind, tensors in _build.resident_tensors(model, opt).items():
            tracker.seed(tensors, kind)
        batch = {k: shadowed_meta(v) for k, v in real_batch.items()}
        tracker.seed(batch.values(), "forward")
        with tracker:
            train_step(model, batch, opt, tracker)
        tracker.close()
    tracker.notes.extend(n for n in warmup.notes if n not in tracker.notes)
    return tracker


def measure_step(model: nn.Module, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> LiveBytes:
    """Measure one real training step the way :func:`estimate` predicts it: the tracker is seeded
    with everything alive before the step (weights, quantization state, adapters, optimizer
    states, the batch), then the step runs with its phases named. Run one step before, so the
    optimizer states exist. ``peak`` is the measured peak of live tensor bytes."""
    tracker = LiveBytes()
    for kind, tensors in _build.resident_tensors(model, optimizer).items():
        tracker.seed(tensors, kind)
    tracker.seed(batch.values(), "forward")
    with tracker:
        train_step(model, batch, optimizer, tracker)
    tracker.close()
    return tracker


# -- the result ---------------------------------------------------------------------------------


def _block_of(name: str) -> str | None:
    for prefix in ("backward of ", "recompute of "):
        if name.startswith(prefix) and name != LOSS_BACKWARD:
            return name.removeprefix(prefix)
    return None


def _parts(phases: list[PhaseStat], persistent: int) -> tuple[int, int, int]:
    """(saved activations, recompute working set of one block, logits and loss buffers)."""
    index = {p.name: i for i, p in enumerate(phases)}
    end = index.get(LOSS_BACKWARD)
    if end is None:
        return 0, 0, 0
    activations = phases[end].start - persistent
    # the head: from the last block's forward end to the loss backward's first block
    head = max((i for i in range(end) if phases[i].name.startswith("forward after ")), default=None)
    if head is None:
        head = max((i for i in range(end) if phases[i].name == "forward"), default=end)
    first_block = next((i for i in range(end, len(phases)) if _block_of(phases[i].name)), len(phases))
    stop = min(first_block, index.get(OPTIMIZER, len(phases)))
    logits = max((p.peak for p in phases[head:stop]), default=0) - phases[head].start
    # each block's backward: from its first backward phase until another block's begins
    recompute = 0
    i = first_block
    while i < len(phases):
        block = _block_of(phases[i].name)
        if block is None:
            i += 1
            continue
        j = i
        while j + 1 < len(phases) and _block_of(phases[j + 1].name) == block:
            j += 1
        recompute = max(recompute, max(p.peak for p in phases[i : j + 1]) - phases[i].start)
        i = j + 1
    return max(activations, 0), max(recompute, 0), max(logits, 0)


def _result(
    tracker: LiveBytes,
    trained: nn.Module,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    plan: Any,
    qc: Any,
    run: tuple[int, int, str, str],
    model: nn.Module,
) -> MemoryEstimate:
    batch_size, seq_len, device, optimizer = run
    resident = {k: _build.storage_bytes(v) for k, v in _build.resident_tensors(trained, opt).items()}
    persistent = tracker.phases[0].start
    activations, recompute, logits = _parts(tracker.phases, persistent)
    notes = tuple(tracker.notes) + tuple(f"plan: {w}" for w in plan.warnings)
    return MemoryEstimate(
        peak_bytes=int(tracker.peak),
        peak_at=tracker.peak_at,
        quantized_bytes=resident[_build.QUANTIZED],
        weight_bytes=resident[_build.WEIGHTS],
        adapter_bytes=resident[_build.ADAPTERS],
        gradient_bytes=sum(p.numel() * p.element_size() for p in params),
        optimizer_bytes=resident[_build.STATES],
        activation_bytes=activations,
        recompute_bytes=recompute,
        logits_bytes=logits,
        live_at_peak=MappingProxyType({k: int(v) for k, v in tracker.live_at_peak.items() if v}),
        batch_size=batch_size,
        seq_len=seq_len,
        device=device,
        optimizer=optimizer,
        model=type(unwrap_model(model)).__name__,
        quantization=_describe_quantization(qc),
        backend=plan.backend,
        checkpointing=_describe_checkpointing(plan),
        trainable_params=sum(p.numel() for p in params),
        notes=notes,
    )
