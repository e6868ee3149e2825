"""The cast and compute-dtype step planners, and the cast apply step.

One compute dtype per model (DESIGN "The orchestrator"): the quantized layers' compute dtype
(``QuantBackend.compute_dtype``), else the dtype the upcast produces, else the model's dtype.
A module stored narrower than it computes at it, its weight brought up at use
(:mod:`kbitprep._compute`); a module stored wider computes as stored. Activations flow in the
widest of those dtypes (``activation_dtype``); a module computing in another dtype has its
inputs cast to its own, and inside a repeated block its output cast back. When no module needs
any of this (peft's default policies), nothing is added.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn

from kbitprep._context import Context, ParamEntry, Step, matches, nbytes_as
from kbitprep._errors import InvalidArgumentError
from kbitprep._plan import CastItem, ModelInput, ModulePrecision, PreparationPlan, UndoLog
from kbitprep.backends.base import is_storage_dtype, tensor_nbytes

__all__ = ["apply_casts", "plan_casts", "plan_compute"]

# casts from these to a wider float are exact, so undo casts back instead of keeping copies
_WIDENING = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}

# floating inputs transformers models take (audio features, images, precomputed embeddings)
FLOAT_INPUTS = ("input_features", "input_values", "pixel_values", "pixel_values_videos", "inputs_embeds")


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _target(ctx: Context, e: ParamEntry) -> torch.dtype | None:
    """The dtype the plan casts ``e`` to, or None (kept patterns already excluded)."""
    p, opts, dist = e.param, ctx.options, ctx.distributed
    if dist.mode is not None and not dist.upcast_kept:  # one dtype for the engine; never an upcast
        wanted = dist.shard_dtype if dist.cast_to_shard_dtype else None
        return wanted if wanted is not None and p.dtype != wanted else None
    name = e.names[0]
    if opts.upcast == "auto":
        wanted_cast = ctx.strategy.should_upcast(name, p, e.module)
    elif opts.upcast in ("all", "none"):
        wanted_cast = opts.upcast == "all"
    else:
        wanted_cast = _ask_policy(opts.upcast, name, p, e.module)
    return opts.upcast_dtype if wanted_cast and p.dtype != opts.upcast_dtype else None


def _ask_policy(policy: Callable[[str, nn.Parameter, nn.Module], object], name: str, p: nn.Parameter, m: nn.Module) -> bool:
    """The answer of a callable ``upcast`` for one parameter: ``True`` or ``False`` (a 0-d bool
    tensor counts), asked while planning, so a bad policy changes nothing.

    Raises:
        InvalidArgumentError: The callable raised, or returned something else than a bool
            (``"no"`` would otherwise read as True and cast everything).
    """
    where = f"for parameter {name!r} ({p.dtype}, shape {tuple(p.shape)})"
    try:
        answer = policy(name, p, m)
    except Exception as exc:
        raise InvalidArgumentError(
            f"The upcast callable raised {type(exc).__name__}: {exc} {where}. It is called as "
            "upcast(name, param, module) for every floating parameter that is not quantized storage and must "
            "return True (cast) or False; nothing was changed."
        ) from exc
    if isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1:
        return bool(answer)
    if not isinstance(answer, bool):
        raise InvalidArgumentError(
            f"The upcast callable returned {answer!r} ({type(answer).__name__}) {where}; it must return True "
            "(cast) or False. Nothing was changed."
        )
    return answer


def plan_casts(ctx: Context) -> Step:
    """Which plain floating parameters are cast, and the bytes it costs."""
    step = Step()
    casts: list[CastItem] = []
    matched: set[str] = set()
    lowered: set[str] = set()  # patterns that hold at least one parameter below the upcast dtype
    for e in ctx.inventory:
        if not e.castable:
            continue
        hits = [] if e.adapter else [k for k in ctx.options.keep if matches(k, e.names)]
        matched.update(hits)
        if _bits(e.param.dtype) < _bits(ctx.options.upcast_dtype):
            lowered.update(hits)
        to = None if hits else _target(ctx, e)
        if to is not None:
            p = e.param
            item = CastItem(
                e.names[0],
                tuple(p.shape),
                str(p.dtype),
                str(to),
                tensor_nbytes(p),
                nbytes_as(p, to),
                tuple(e.names[1:]),
            )
            casts.append(item)
    for pattern in ctx.options.keep:
        if pattern not in matched:
            step.warnings.append(
                f"keep_in_low_precision pattern {pattern!r} matches no parameter; check the name against "
                "model.named_parameters() (exact name, dotted suffix such as 'lm_head', or a glob)."
            )
        elif pattern not in lowered:
            step.warnings.append(
                f"keep_in_low_precision pattern {pattern!r} matches only parameters already in "
                f"{ctx.options.upcast_dtype} or wider (an earlier prepare may have upcast them); kbitprep never "
                "casts down, so they stay as they are. Undo the earlier preparation (report.undo()) first to keep "
                "them low."
            )
    delta = sum(c.bytes_after - c.bytes_before for c in casts)
    step.warnings.extend(_cast_warnings(ctx, casts, delta))
    step.fields.update(casts=tuple(casts), bytes_delta=delta)
    return step


def _cast_warnings(ctx: Context, casts: list[CastItem], delta: int) -> list[str]:
    opts, strategy = ctx.options, ctx.strategy
    found: list[str] = []
    if not casts or (ctx.distributed.mode is not None and not ctx.distributed.upcast_kept):
        return found
    if opts.upcast == "all" and not strategy.unquantized:
        auto = any(strategy.should_upcast(e.names[0], e.param, e.module) for e in ctx.inventory if e.plain_float)
        if not auto:
            found.append(
                f"upcast='all' on a {strategy.name} model: its quantized kernels expect their own compute dtype; "
                f"kbitprep casts the inputs of those layers to it, but the upcast costs {delta:,} bytes for no "
                "accuracy the kernels can use."
            )
    if strategy.unquantized and delta > 0:
        what = (
            "The model is not quantized" if opts.backend == "auto" else "backend=none treats the model as unquantized"
        )
        found.append(
            f"{what}; upcasting {len(casts)} parameter(s) to {opts.upcast_dtype} adds {delta:,} bytes "
            f"({delta} bytes), as peft does. Pass upcast='none' to keep the model's dtype."
        )
    return found


# -- compute dtype ----------------------------------------------------------------------------


def _final_dtypes(ctx: Context, casts: tuple[CastItem, ...]) -> dict[int, torch.dtype]:
    to = {c.name: _dtype(c.to_dtype) for c in casts}
    return {id(e.param): to.get(e.names[0], e.param.dtype) for e in ctx.inventory if e.castable}


def _model_compute_dtype(ctx: Context, casts: tuple[CastItem, ...]) -> torch.dtype | None:
    declared = ctx.strategy.compute_dtype(ctx.base)
    if declared is not None and declared.is_floating_point and not is_storage_dtype(declared):
        return declared
    if casts:  # the dtype the upcast (or the engine's one dtype) produces
        return _dtype(casts[0].to_dtype)
    by_bytes: Counter[torch.dtype] = Counter()
    for e in ctx.inventory:
        if e.plain_float:
            by_bytes[e.param.dtype] += tensor_nbytes(e.param)
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def _own_plain(ctx: Context) -> dict[int, list[tuple[str, ParamEntry]]]:
    """Module id → its own plain floating parameters (leaf name, entry)."""
    modules = dict(ctx.model.named_modules(remove_duplicate=False))
    out: dict[int, list[tuple[str, ParamEntry]]] = {}
    for e in ctx.inventory:
        if not e.castable:
            continue
        for name in e.names:  # a tied parameter belongs to every module that holds it
            owner, _dot, leaf = name.rpartition(".")
            module = modules.get(owner, ctx.model)
            out.setdefault(id(module), []).append((leaf, e))
    return out


def _module_rows(
    ctx: Context, final: dict[int, torch.dtype], compute: torch.dtype
) -> Iterator[tuple[str, torch.dtype, torch.dtype, tuple[str, ...]]]:
    """(module name, stored, computes, upcast-at-use) for each module with its own plain floats,
    and (name, kernel dtype, kernel dtype, ()) for each quantized layer with an input dtype."""
    own = _own_plain(ctx)
    holds_storage = {id(e.module) for e in ctx.inventory if e.storage}
    for name, module in ctx.model.named_modules():
        params = own.get(id(module))
        kernel = ctx.strategy.input_dtype(module)
        if kernel is not None and kernel.is_floating_point and not is_storage_dtype(kernel):
            yield name, kernel, kernel, ()
        elif params and id(module) not in holds_storage:  # a quantized layer without an input
            # dtype converts its inputs and its own bias itself (bitsandbytes)
            dtypes = {leaf: final[id(e.param)] for leaf, e in params}
            stored = dtypes.get("weight", next(iter(dtypes.values())))
            computes = compute if _bits(stored) < _bits(compute) else stored
            upcast = tuple(leaf for leaf, d in dtypes.items() if d != computes)
            yield name, stored, computes, upcast


def _activation_dtype(
    rows: list[tuple[str, torch.dtype, torch.dtype, tuple[str, ...]]], compute: torch.dtype
) -> torch.dtype:
    if not rows:
        return compute
    widest = max(_bits(c) for _n, _s, c, _u in rows)
    candidates = Counter(c for _n, _s, c, _u in rows if _bits(c) == widest)
    return compute if compute in candidates else candidates.most_common(1)[0][0]


def plan_compute(ctx: Context, casts: tuple[CastItem, ...]) -> Step:
    """The compute dtype, the activation dtype, the modules that compute in another dtype than
    they store or than the activations around them, and the floating model inputs."""
    step = Step()
    compute = _model_compute_dtype(ctx, casts)
    if compute is None:
        return step
    rows = list(_module_rows(ctx, _final_dtypes(ctx, casts), compute))
    act = _activation_dtype(rows, compute)
    mixed = any(c != act or u for _n, _s, c, u in rows)
    inputs = _model_inputs(ctx, {n: c for n, _s, c, _u in rows}, mixed)
    # a module computing in the activations' dtype up to the last block only ever receives
    # them (every module feeding blocks returns them), except where a model input enters;
    # after the last block (final norm, lm_head) modules may pass on their own dtype
    entries = {i.module for i in inputs}
    precision: list[ModulePrecision] = []
    if mixed:
        feeding = _names_feeding_blocks(ctx.model)
        for name, stored, computes, upcast in rows:
            if computes == act and not upcast and name in feeding and name not in entries:
                continue
            out = str(act) if computes != act and name in feeding else None
            precision.append(ModulePrecision(name, str(stored), str(computes), upcast, out))
    step.fields.update(
        compute_dtype=str(compute),
        activation_dtype=str(act),
        precision=tuple(precision),
        model_inputs=tuple(inputs),
    )
    step.warnings.extend(_input_warnings(ctx, step.fields["model_inputs"]))
    return step


def _names_feeding_blocks(model: nn.Module) -> set[str]:
    """Names of the modules whose output flows on into a repeated block (an element of an
    ``nn.ModuleList``): those inside a block, and those registered before the last block
    (embeddings, stems, an encoder's final norm feeding the decoder, a vision projector).
    Their outputs keep the activations' dtype, so the functional code between modules (RoPE's
    cos/sin, SDPA's q/k/v, residual adds) never sees two dtypes. Modules after the last block
    (the final norm, ``lm_head``) return the dtype they compute in: the model's outputs."""
    order = [name for name, _m in model.named_modules()]
    in_blocks: set[str] = set()
    for lname, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, block in module.named_children():
                head = f"{lname}.{index}" if lname else index
                in_blocks.update(f"{head}.{n}" if n else head for n, _m in block.named_modules())
    last = max((i for i, name in enumerate(order) if name in in_blocks), default=-1)
    return in_blocks | set(order[: last + 1])


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(cls: type) -> frozenset[str]:
    found = _FORWARD_PARAMS.get(cls)
    if found is None:
        try:
            found = frozenset(inspect.signature(getattr(cls, "forward")).parameters)  # noqa: B009
        except (TypeError, ValueError, AttributeError):
            found = frozenset()
        _FORWARD_PARAMS[cls] = found
    return found


def _model_inputs(ctx: Context, computes: dict[str, torch.dtype], mixed: bool) -> list[ModelInput]:
    """For each floating input, the deepest module whose forward takes it, then the first module
    below it (not an embedding) that holds its own floating parameters: the one it meets first."""
    deepest: dict[str, str] = {}
    for name, module in ctx.model.named_modules():
        for arg in FLOAT_INPUTS:
            if arg in _forward_params(type(module)):
                deepest[arg] = name
    modules = dict(ctx.model.named_modules())
    found: list[ModelInput] = []
    for arg, owner in deepest.items():
        prefix = f"{owner}." if owner else ""
        for name, module in modules.items():
            if name.startswith(prefix) and name in computes and not isinstance(module, nn.Embedding):
                found.append(ModelInput(arg, name, str(computes[name]), mixed))
                break
    return found


def _input_warnings(ctx: Context, inputs: tuple[ModelInput, ...]) -> list[str]:
    modules = dict(ctx.model.named_modules())
    storage = {id(e.param) for e in ctx.inventory if e.storage}  # never a compute dtype (issue 11)
    found = []
    for item in inputs:
        module = modules[item.module]
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point() and id(p) not in storage]
        # norms convert their input themselves; a convolution or matmul refuses another dtype
        strict = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if item.cast or not strict or not own or str(own[0].dtype) == item.dtype:
            continue
        found.append(
            f"Model input {item.name!r} must now be {item.dtype}: {item.module} is cast from {own[0].dtype}. "
            f"Cast it before the forward (e.g. batch[{item.name!r}].to({item.dtype})); kbitprep adds no "
            "cast in the default policy, to keep peft's behaviour."
        )
    return found


# -- apply ------------------------------------------------------------------------------------


def _dtype(text: str) -> torch.dtype:
    value = getattr(torch, text.removeprefix("torch."))
    assert isinstance(value, torch.dtype)
    return value


def _cast_data(param: nn.Parameter, dtype: torch.dtype) -> None:
    param.data = param.data.to(dtype)


def apply_casts(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """Cast what ``p.casts`` lists; a widening cast is undone by casting back (exact), any
    other keeps the original storage to restore."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in p.casts:
        param = params[c.name]
        to = _dtype(c.to_dtype)
        if param.dtype == to:
            continue
        old = param.dtype
        if to in _WIDENING.get(old, ()):
            param.data = param.data.to(to)
            log.add(functools.partial(_cast_data, param, old))
        else:
            original = param.data
            param.data = param.data.to(to)
            log.add(functools.partial(setattr, param, "data", original))
