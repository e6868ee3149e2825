"""The checkpointing step: its planner and its apply step.

``use_reentrant`` is always explicit: the caller's, else ``False``, else what the distributed
engine requires. Whatever transformers' own enabling call installs for training to work is
kept and reported, never removed; kbitprep adds the input-grad hook reentrant
checkpointing needs where the call adds none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kbitprep._errors import InvalidArgumentError, PlanWarning
from kbitprep._hf import unwrap_model
from kbitprep._plan import PreparationPlan, UndoLog
from kbitprep.steps import checkpoint_transformers as ckpt
from kbitprep.steps.checkpoint_guard import guard_checkpointing
from kbitprep.steps.checkpoint_layouts import checkpoint_blocks, install_selective
from kbitprep.steps.context import Context, StepPlan
from kbitprep.steps.distributed import DistributedDecision

__all__ = ["CheckpointPlan", "apply", "plan_checkpointing"]


@dataclass(frozen=True, kw_only=True)
class CheckpointPlan(StepPlan):
    """The checkpointing step's decisions (fields of :class:`~kbitprep.PreparationPlan`)."""

    gradient_checkpointing: bool = False
    use_reentrant: bool | None = None
    input_grad_hook: bool = False
    input_grad_modules: tuple[str, ...] = ()
    use_cache_off: bool = False
    checkpoint_kwargs: Mapping[str, Any] = field(default_factory=dict)
    activation_offload: bool = False
    checkpoint_every_n_layers: int = 1
    checkpoint_trainable_blocks_only: bool = False
    checkpointed_blocks: tuple[int, int] | None = None


def _mode(
    ctx: Context, use_gradient_checkpointing: bool, use_reentrant: bool, kwargs_given: bool, found: list[PlanWarning]
) -> tuple[bool, bool | None, bool]:
    """(checkpointing on after prepare, use_reentrant, kept on as found) and the warnings that
    explain it. ``use_reentrant`` is the caller's (``False`` when not given); a strategy that
    keeps checkpointing as found keeps the model's own unless ``kwargs_given``."""
    strategy, base = ctx.strategy, ctx.base
    already = ckpt.is_enabled(base)
    # a strategy that keeps checkpointing as found wants it exactly when the model has it on
    wanted = already if strategy.keeps_checkpointing_as_found else strategy.wants_gradient_checkpointing(base)
    gc = use_gradient_checkpointing and wanted
    if gc and not ckpt.supports(base) and not already:
        found.append(
            PlanWarning(
                "checkpointing",
                f"{type(base).__name__} has no gradient checkpointing switch (no activation_checkpointing_enable "
                "/ gradient_checkpointing_enable, or supports_gradient_checkpointing is False); checkpointing "
                "stays off, so activations use more memory. Pass use_gradient_checkpointing=False to silence this.",
            )
        )
        return False, None, False
    if gc:
        keep_mode = strategy.keeps_checkpointing_as_found and already and not kwargs_given
        return True, ckpt.current_use_reentrant(base) if keep_mode else use_reentrant, False
    if already:
        reentrant = ckpt.current_use_reentrant(base)
        found.append(
            PlanWarning(
                "checkpointing",
                f"Gradient checkpointing was already on (use_reentrant={reentrant}) and stays on: kbitprep does "
                "not turn it off. Call model.activation_checkpointing_disable() (gradient_checkpointing_disable "
                "on transformers 4) before prepare if you want it off.",
            )
        )
        return True, reentrant, True
    if strategy.keeps_checkpointing_as_found and use_gradient_checkpointing:
        found.append(
            PlanWarning(
                "checkpointing",
                "Gradient checkpointing left off because the model is not quantized (as peft does). Turn it on "
                "with model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': "
                "False}) (gradient_checkpointing_enable on transformers 4) if you need it.",
            )
        )
    return False, None, False


def _engine_reentrant(engine: DistributedDecision, use_reentrant: bool | None, kwargs_given: bool) -> bool | None:
    """The engine's required ``use_reentrant`` where the caller left it to the default.

    Raises:
        InvalidArgumentError: The caller passed another ``use_reentrant`` than the engine needs.
    """
    required = engine.use_reentrant
    if use_reentrant is None or required is None or use_reentrant == required:
        return use_reentrant
    if kwargs_given:
        raise InvalidArgumentError(
            f"use_reentrant={use_reentrant} cannot be combined with distributed={engine.mode!r}, which "
            f"needs use_reentrant={required}. Pass gradient_checkpointing_kwargs={{'use_reentrant': "
            f"{required}}} or leave it out."
        )
    return required


def _check_layout(ctx: Context, gc: bool, activation_offload: bool, checkpoint_every_n_layers: int) -> None:
    asked = activation_offload or checkpoint_every_n_layers != 1
    if asked and gc and not ckpt.supports_layout(ctx.base):
        raise InvalidArgumentError(
            f"activation_offload={activation_offload} / checkpoint_every_n_layers="
            f"{checkpoint_every_n_layers} need transformers' activation_checkpointing_enable with "
            f"offload and every_n_layers (transformers 5.24+); {type(ctx.base).__name__} has none. Upgrade "
            "transformers, or leave both at their defaults."
        )


def _offload(ctx: Context, gc: bool, activation_offload: bool, found: list[PlanWarning]) -> bool:
    """Offload only where there is device memory to free: transformers 5.24 wraps each
    checkpoint in ``save_on_cpu(pin_memory=True)``, which raises on a machine without an
    accelerator, and on the CPU the activations already live in host memory."""
    if not (gc and activation_offload):
        return False
    if all(e.param.device.type == "cpu" for e in ctx.inventory):
        found.append(
            PlanWarning(
                "checkpointing",
                "activation_offload=True is not applied: every parameter is on the CPU, so the activations "
                "already live in host memory, and transformers' offload pins host memory, which needs an "
                "accelerator. Move the model to the accelerator before prepare to offload.",
            )
        )
        return False
    return True


def _blocks(ctx: Context, gc: bool, every: int, trainable_only: bool) -> tuple[int, int] | None:
    """(blocks checkpointed at a training forward of the model as it stands now, blocks).

    The every-block layout checkpoints them all. The selective layouts (every n-th block, or
    trainable blocks only) apply the frozen-prefix rule (:class:`kbitprep.steps.checkpoint_layouts._FrozenPrefix`):
    the blocks before the first one that a backward reaches build no graph and are not
    checkpointed; from it on, every block of the layout is."""
    blocks = checkpoint_blocks(ctx.base)
    if not gc or not blocks:
        return None
    selective = trainable_only or every != 1  # the frozen-prefix rule applies
    first = _first_trainable(ctx, blocks) if selective else 0
    return sum(1 for i in range(first, len(blocks)) if i % every == 0), len(blocks)


def _first_trainable(ctx: Context, blocks: list[nn.Module]) -> int:
    """Index of the first block a backward reaches, read in model order: the first block
    holding an adapter parameter (what stays trainable after prepare), or the block after the
    ones passed when an adapter outside every block comes first (a trainable copy of the input
    embeddings: 0); ``len(blocks)`` when no adapter is attached yet."""
    index = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    passed = -1
    for e in ctx.inventory:
        i = index.get(id(e.param))
        if e.adapter:
            return i if i is not None else passed + 1
        if i is not None:
            passed = max(passed, i)
    return len(blocks)


def plan_checkpointing(
    ctx: Context,
    engine: DistributedDecision,
    use_gradient_checkpointing: bool,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None,
    activation_offload: bool,
    checkpoint_every_n_layers: int,
    checkpoint_trainable_blocks_only: bool,
) -> CheckpointPlan:
    """Checkpointing on or off, its mode and layout, and the input-grad wiring.

    Args:
        ctx: The shared planning context.
        engine: The distributed step's decision (the ``use_reentrant`` an engine requires).
        use_gradient_checkpointing: The option of :func:`kbitprep.plan`.
        gradient_checkpointing_kwargs: The option of :func:`kbitprep.plan`; its
            ``use_reentrant`` is made explicit (the caller's, else ``False``).
        activation_offload: The option of :func:`kbitprep.plan`.
        checkpoint_every_n_layers: The option of :func:`kbitprep.plan`.
        checkpoint_trainable_blocks_only: The option of :func:`kbitprep.plan`.

    Raises:
        InvalidArgumentError: A layout option on a transformers without layouts, or a
            ``use_reentrant`` the distributed engine cannot run.
    """
    found: list[PlanWarning] = []
    kwargs = ckpt.resolve_kwargs(gradient_checkpointing_kwargs)
    given = gradient_checkpointing_kwargs is not None
    gc, use_reentrant, kept_on = _mode(ctx, use_gradient_checkpointing, kwargs["use_reentrant"], given, found)
    use_reentrant = _engine_reentrant(engine, use_reentrant, given)
    _check_layout(ctx, gc, activation_offload, checkpoint_every_n_layers)
    entries = ckpt.entry_modules(ctx.base) if gc else []
    installs = gc and (bool(use_reentrant) or ckpt.enable_installs_input_grads(ctx.base))
    hooked = any(ckpt.has_input_grad_hook(m) for _n, m in entries)
    if gc and use_reentrant and not entries:
        found.append(
            PlanWarning(
                "checkpointing",
                "Reentrant checkpointing was requested but the model has no input embedding module "
                "(get_input_embeddings is missing or fails, and there is no nn.Embedding): adapters inside "
                "checkpointed blocks will get no gradient. Use use_reentrant=False.",
            )
        )
    use_cache = getattr(getattr(ctx.base, "config", None), "use_cache", None)
    if use_reentrant is not None:
        kwargs["use_reentrant"] = use_reentrant
    offload = _offload(ctx, gc, activation_offload, found)
    return CheckpointPlan(
        gradient_checkpointing=gc,
        use_reentrant=use_reentrant,
        input_grad_hook=bool(entries) and (installs or hooked),
        input_grad_modules=tuple(ctx.prefix + n for n, _m in entries) if (installs or hooked) else (),
        use_cache_off=((gc and not kept_on) or engine.mode is not None) and use_cache is True,
        checkpoint_kwargs=kwargs,
        activation_offload=offload,
        checkpoint_every_n_layers=checkpoint_every_n_layers if gc else 1,
        checkpoint_trainable_blocks_only=gc and checkpoint_trainable_blocks_only,
        checkpointed_blocks=_blocks(ctx, gc, checkpoint_every_n_layers, checkpoint_trainable_blocks_only),
        warnings=tuple(found),
    )


def _needs_enable(base: nn.Module, p: PreparationPlan) -> bool:
    if not ckpt.is_enabled(base) or ckpt.current_use_reentrant(base) != p.use_reentrant:
        return True
    return p.activation_offload or p.checkpoint_every_n_layers != 1


def apply(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """Turn checkpointing on as planned, add the input-grad hooks the plan lists where none is,
    turn ``use_cache`` off, and guard the model against later enabling calls."""
    base = unwrap_model(model)
    kwargs: dict[str, Any] = dict(p.checkpoint_kwargs)
    if p.gradient_checkpointing and _needs_enable(base, p):
        ckpt.enable_recorded(base, kwargs, p.checkpoint_every_n_layers, p.activation_offload, log.add)
    config: Any = getattr(base, "config", None)
    if p.use_cache_off and config is not None and config.use_cache is True:
        config.use_cache = False
        log.add(lambda: setattr(config, "use_cache", True))
    modules = dict(model.named_modules())
    for name in p.input_grad_modules:
        module = modules[name]
        if not ckpt.has_input_grad_hook(module):
            log.add(ckpt.add_input_grad_hook(module).remove)
    if p.gradient_checkpointing and (p.checkpoint_trainable_blocks_only or p.checkpoint_every_n_layers != 1):
        install_selective(base, log.add)
    # a Trainer / SFTTrainer enabling checkpointing or input grads again adds no second hook, and
    # checkpointing turned on later still gets the input-grad wiring
    guard_checkpointing(base, kwargs, log.add)
