"""The compute step: one compute dtype per model, the modules that compute in another dtype
than they store, the activations' dtype and the floating model inputs; applied as the runtime
rules of :mod:`kbitprep.steps.cast_at_use`.

The quantized layers' compute dtype (``QuantBackend.compute_dtype``, read from the layers
present), else the dtype the upcast produces, else the model's dtype. A module computes in the
dtype its parameters have after the casts of the same call without ``keep_in_low_precision``, or
at the compute dtype where that is narrower, its parameters stored narrower brought up at use.
So keeping a module low changes its storage only: it computes as it would have without keep (for
bitsandbytes under ``upcast="auto"``, at ``upcast_dtype``, as peft), and the activation dtype,
the boundary casts and the model inputs are those of the call without keep. Activations flow in
the widest compute dtype (``activation_dtype``); a module computing in another dtype has its
inputs cast to its own, and inside a repeated block its output cast back. When no module needs
any of this (peft's default policies), nothing is added.

A floating model input left to the caller is checked by a dry run on the meta device
(:mod:`kbitprep.steps.input_check`): a warning says it must now be passed in another dtype only
when its old dtype would fail or make its first consumer compute otherwise.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kbitprep._errors import PlanWarning
from kbitprep._names import KeepPatterns, covering, match_keep
from kbitprep._plan import CastItem, ModelInput, ModulePrecision, PreparationPlan, UndoLog
from kbitprep._storage import is_storage_dtype, tensor_nbytes
from kbitprep.steps.cast import target_dtype
from kbitprep.steps.cast_at_use import ComputeSpec, install_adopt, install_spec, spec_of
from kbitprep.steps.context import Context, ParamEntry, StepPlan, bits
from kbitprep.steps.distributed import DistributedDecision
from kbitprep.steps.input_check import dry_run_input

__all__ = ["ComputePlan", "apply", "plan_compute"]

# floating inputs transformers models take (audio features, images, precomputed embeddings)
FLOAT_INPUTS = ("input_features", "input_values", "pixel_values", "pixel_values_videos", "inputs_embeds")


@dataclass(frozen=True, kw_only=True)
class ComputePlan(StepPlan):
    """The compute step's decisions (fields of :class:`~kbitprep.PreparationPlan`)."""

    compute_dtype: torch.dtype | None = None
    activation_dtype: torch.dtype | None = None
    precision: tuple[ModulePrecision, ...] = ()
    model_inputs: tuple[ModelInput, ...] = ()


def _final_dtypes(ctx: Context, casts: tuple[CastItem, ...]) -> dict[int, torch.dtype]:
    to = {c.name: c.to_dtype for c in casts}
    return {id(e.param): to.get(e.names[0], e.param.dtype) for e in ctx.inventory if e.castable}


def _unkept_dtypes(
    ctx: Context,
    final: dict[int, torch.dtype],
    engine: DistributedDecision,
    keep_in_low_precision: KeepPatterns,
    upcast: object,
    upcast_dtype: torch.dtype,
) -> dict[int, torch.dtype]:
    """Each castable parameter's dtype after the casts the same call would plan without
    ``keep_in_low_precision``: the dtype a kept parameter computes in.

    Keep changes storage only: a kept module computes in the dtype the
    rest of the plan would have given it (for bitsandbytes under ``upcast="auto"``,
    ``upcast_dtype``, as peft), its weight brought up at use. So every compute-dtype decision
    below is taken on these dtypes, and the stored ones only say what is brought up at use.
    The upcast policy is asked again only for the parameters the keep patterns hold (the test
    :func:`plan_casts` applies); for the others ``final`` is its answer.
    """
    if not keep_in_low_precision:
        return final
    keep = match_keep(ctx.model, ctx.prefix, keep_in_low_precision)
    unkept = dict(final)
    for e in ctx.inventory:
        if e.castable and not e.adapter and covering(keep, e.names):
            to = target_dtype(ctx, e, engine, upcast, upcast_dtype)
            if to is not None:
                unkept[id(e.param)] = to
    return unkept


def _model_compute_dtype(ctx: Context, unkept: dict[int, torch.dtype]) -> torch.dtype | None:
    """The quantized layers' compute dtype (``QuantBackend.compute_dtype``), else the dtype the
    upcast produces, else the model's dtype."""
    declared = ctx.strategy.compute_dtype(ctx.base)
    if declared is not None and declared.is_floating_point and not is_storage_dtype(declared):
        return declared
    for e in ctx.inventory:  # the dtype the upcast (or the engine's one dtype) produces
        if e.castable and unkept[id(e.param)] != e.param.dtype:
            return unkept[id(e.param)]
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


@dataclass(frozen=True, slots=True)
class _Row:
    """How one module computes: ``stored`` (after the casts), ``computes``, the parameters
    brought up to ``computes`` at use (``upcast``), and those the same call without keep patterns
    would bring up (``unkept_upcast``, which decides whether that call mixes dtypes)."""

    name: str
    stored: torch.dtype
    computes: torch.dtype
    upcast: tuple[str, ...]
    unkept_upcast: tuple[str, ...]


def _module_rows(
    ctx: Context, final: dict[int, torch.dtype], unkept: dict[int, torch.dtype], compute: torch.dtype
) -> Iterator[_Row]:
    """A row for each module with its own plain floats, and (kernel dtype, kernel dtype) for each
    quantized layer with an input dtype. A module computes in its parameters' dtype without
    keep patterns (``unkept``), or at ``compute`` where that is narrower (a module stored
    below the compute dtype computes at it)."""
    own = _own_plain(ctx)
    holds_storage = {id(e.module) for e in ctx.inventory if e.storage}
    for name, module in ctx.model.named_modules():
        params = own.get(id(module))
        kernel = ctx.strategy.input_dtype(module)
        if kernel is not None and kernel.is_floating_point and not is_storage_dtype(kernel):
            yield _Row(name, kernel, kernel, (), ())
        elif params and id(module) not in holds_storage:  # a quantized layer without an input
            # dtype converts its inputs and its own bias itself (bitsandbytes)
            stored = {leaf: final[id(e.param)] for leaf, e in params}
            wanted = {leaf: unkept[id(e.param)] for leaf, e in params}
            main = wanted.get("weight", next(iter(wanted.values())))
            computes = compute if bits(main) < bits(compute) else main
            yield _Row(
                name,
                stored.get("weight", next(iter(stored.values()))),
                computes,
                tuple(leaf for leaf, d in stored.items() if d != computes),
                tuple(leaf for leaf, d in wanted.items() if d != computes),
            )


def _activation_dtype(rows: list[_Row], compute: torch.dtype) -> torch.dtype:
    if not rows:
        return compute
    widest = max(bits(r.computes) for r in rows)
    candidates = Counter(r.computes for r in rows if bits(r.computes) == widest)
    return compute if compute in candidates else candidates.most_common(1)[0][0]


def plan_compute(
    ctx: Context,
    casts: tuple[CastItem, ...],
    engine: DistributedDecision,
    keep_in_low_precision: KeepPatterns,
    upcast: object,
    upcast_dtype: torch.dtype,
) -> ComputePlan:
    """The compute dtype, the activation dtype, the modules that compute in another dtype than
    they store or than the activations around them, and the floating model inputs.

    Everything but the parameters brought up at use is decided as for the same call without
    ``keep_in_low_precision`` (:func:`_unkept_dtypes`), so keep changes storage only: the same
    compute dtypes, activation dtype, boundary casts and model inputs. A kept module gets a row
    (its weight brought up at use) even where that call mixes nothing; its input cast is then to
    the activations' dtype, which is what it receives there.

    Args:
        ctx: The shared planning context.
        casts: The cast step's casts.
        engine: The distributed step's decision.
        keep_in_low_precision: The ``keep_in_low_precision`` option: what it covers computes as
            it would without it, its parameters brought up at use.
        upcast: The ``upcast`` option.
        upcast_dtype: The ``upcast_dtype`` option.
    """
    final = _final_dtypes(ctx, casts)
    unkept = _unkept_dtypes(ctx, final, engine, keep_in_low_precision, upcast, upcast_dtype)
    compute = _model_compute_dtype(ctx, unkept)
    if compute is None:
        return ComputePlan()
    rows = list(_module_rows(ctx, final, unkept, compute))
    act = _activation_dtype(rows, compute)
    mixed = any(r.computes != act or r.unkept_upcast for r in rows)  # without keep patterns
    inputs = _model_inputs(ctx, {r.name: r.computes for r in rows}, mixed)
    # a module computing in the activations' dtype up to the last block only ever receives
    # them (every module feeding blocks returns them), except where a model input enters;
    # after the last block (final norm, lm_head) modules may pass on their own dtype
    entries = {i.module for i, _owner in inputs}
    feeding = _names_feeding_blocks(ctx.model) if mixed else set()
    precision: list[ModulePrecision] = []
    for r in rows:
        if not r.upcast and (not mixed or (r.computes == act and r.name in feeding and r.name not in entries)):
            continue
        out = act if r.computes != act and r.name in feeding else None
        precision.append(ModulePrecision(r.name, r.stored, r.computes, r.upcast, out))
    checked = _check_inputs(ctx, inputs, unkept)
    return ComputePlan(
        compute_dtype=compute,
        activation_dtype=act,
        precision=tuple(precision),
        model_inputs=tuple(i for i, _w in checked),
        warnings=tuple(PlanWarning("precision", w) for _i, w in checked if w),
    )


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


def _model_inputs(ctx: Context, computes: dict[str, torch.dtype], mixed: bool) -> list[tuple[ModelInput, str]]:
    """For each floating input, the deepest module whose forward takes it (its owner), then the
    first module below it (not an embedding) that holds its own floating parameters: the one
    it meets first in registration order. Returns each input with its owner's name."""
    deepest: dict[str, str] = {}
    for name, module in ctx.model.named_modules():
        for arg in FLOAT_INPUTS:
            if arg in _forward_params(type(module)):
                deepest[arg] = name
    modules = dict(ctx.model.named_modules())
    found: list[tuple[ModelInput, str]] = []
    for arg, owner in deepest.items():
        prefix = f"{owner}." if owner else ""
        for name, module in modules.items():
            if name.startswith(prefix) and name in computes and not isinstance(module, nn.Embedding):
                found.append((ModelInput(arg, name, computes[name], mixed), owner))
                break
    return found


def _kernel_dtype(ctx: Context, module: nn.Module) -> torch.dtype | None:
    kernel = ctx.strategy.input_dtype(module)
    return kernel if kernel is not None and kernel.is_floating_point and not is_storage_dtype(kernel) else None


def _check_inputs(
    ctx: Context, inputs: list[tuple[ModelInput, str]], unkept: dict[int, torch.dtype]
) -> list[tuple[ModelInput, str | None]]:
    """Each model input the plan keeps, with its warning (or None).

    An input the plan casts itself, or whose first module keeps its dtype, is kept as found. For
    one left to the caller whose first module now holds another dtype than before, the module
    that takes it is dry-run on the meta device (:func:`kbitprep.steps.input_check.dry_run_input`)
    with the input in its old dtype and in the planned one. No warning that is not true for the
    model at hand: a warning is given only when the old dtype fails there or
    makes its first consumer return other dtypes, and the input is dropped from the plan when
    the old dtype works as the planned one (the model converts it, e.g. CLIP's embeddings, or
    its first consumer does, e.g. an RMSNorm). When the dry run cannot decide, the structural
    rule stands: a ``Linear`` / ``Conv`` module cast from the input's old dtype refuses it.
    """
    modules = dict(ctx.model.named_modules())
    storage = frozenset(id(e.param) for e in ctx.inventory if e.storage)  # never a compute dtype
    found: list[tuple[ModelInput, str | None]] = []
    for item, owner in inputs:
        module = modules[item.module]
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point() and id(p) not in storage]
        if item.cast or not own or own[0].dtype == item.dtype:
            found.append((item, None))
            continue
        old, planned = own[0].dtype, item.dtype
        verdicts = dry_run_input(
            modules[owner], owner, item.name, unkept, storage, lambda m: _kernel_dtype(ctx, m), old, planned
        )
        how = (
            f"Cast it before the forward (e.g. batch[{item.name!r}].to({item.dtype})); kbitprep adds no cast in "
            "the default policy, to keep peft's behaviour."
        )
        if verdicts is None:  # undecided: the structural rule
            strict = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            warning = f"Model input {item.name!r} must now be {item.dtype}: {item.module} is cast from {old}. {how}"
            found.append((item, warning if strict else None))
            continue
        before, after = verdicts
        at = before.consumer or after.consumer or item.module
        item = ModelInput(item.name, at, item.dtype, item.cast)
        if before.error is not None:
            warning = (
                f"Model input {item.name!r} must now be {item.dtype}: in {old} it fails at {at} (now {planned}): "
                f"{before.error}. {how}"
            )
        elif before.returned != after.returned:
            got = ", ".join(str(d) for d in before.returned)
            want = ", ".join(str(d) for d in after.returned)
            warning = (
                f"Model input {item.name!r} must now be {item.dtype}: in {old} it reaches {at} (now {planned}), "
                f"which then returns {got} instead of {want}, so the forward no longer computes as planned. {how}"
            )
        else:  # the old dtype computes as the planned one: nothing to say, nothing to pass
            continue
        found.append((item, warning))
    return found


def apply(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """Give every module in ``p.precision`` its compute-dtype rule, and take it from any module
    an earlier ``prepare`` gave one that this plan does not list (so repeated prepares with
    other options never leave a stale rule)."""
    wanted = {m.name: m for m in p.precision}
    for name, module in model.named_modules():
        row = wanted.get(name)
        if row is None:
            if spec_of(module) is not None:
                install_spec(module, None, log)
            continue
        spec = ComputeSpec(
            name,
            row.computes,
            row.upcast_at_use,
            row.output_to,
        )
        if spec_of(module) != spec:
            install_spec(module, spec, log)
    install_adopt(model, p, log)
