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
from kbitprep._options import Options
from kbitprep._plan import PreparationPlan, UndoLog
from kbitprep.steps import checkpoint_transformers as ckpt
from kbitprep.steps.checkpoint_guard import guard_checkpointing
from kbitprep.steps.checkpoint_layouts import checkpoint_blocks, install_selective
from kbitprep.steps.context import Context, StepPlan

__all__ = ["CheckpointPlan", "apply", "plan"]


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


def _mode(ctx: Context, found: list[PlanWarning]) -> tuple[bool, bool | None, bool]:
    """(checkpointing on after prepare, use_reentrant, kept on as found) and the warnings that
    explain it."""
    opts, strategy, base = ctx.options, ctx.strategy, ctx.base
    gc = opts.use_gradient_checkpointing and strategy.wants_gradient_checkpointing(base)
    already = ckpt.is_enabled(base)
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
        keep_mode = strategy.keeps_checkpointing_as_found and already and not opts.kwargs_given
        return (
            True,
            ckpt.current_use_reentrant(base) if keep_mode else bool(opts.checkpoint_kwargs["use_reentrant"]),
            False,
        )
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
    if strategy.keeps_checkpointing_as_found and opts.use_gradient_checkpointing:
        found.append(
            PlanWarning(
                "checkpointing",
                "Gradient checkpointing left off because the model is not quantized (as peft does). Turn it on "
                "with model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': "
                "False}) (gradient_checkpointing_enable on transformers 4) if you need it.",
            )
        )
    return False, None, False


def _engine_reentrant(ctx: Context, reentrant: bool | None) -> bool | None:
    required = ctx.distributed.use_reentrant
    if reentrant is None or required is None or reentrant == required:
        return reentrant
    if ctx.options.kwargs_given:
        raise InvalidArgumentError(
            f"use_reentrant={reentrant} cannot be combined with distributed={ctx.distributed.mode!r}, which "
            f"needs use_reentrant={required}. Pass gradient_checkpointing_kwargs={{'use_reentrant': "
            f"{required}}} or leave it out."
        )
    return required


def _check_layout(ctx: Context, gc: bool) -> None:
    opts = ctx.options
    asked = opts.activation_offload or opts.checkpoint_every_n_layers != 1
    if asked and gc and not ckpt.supports_layout(ctx.base):
        raise InvalidArgumentError(
            f"activation_offload={opts.activation_offload} / checkpoint_every_n_layers="
            f"{opts.checkpoint_every_n_layers} need transformers' activation_checkpointing_enable with "
            f"offload and every_n_layers (transformers 5.24+); {type(ctx.base).__name__} has none. Upgrade "
            "transformers, or leave both at their defaults."
        )


def _offload(ctx: Context, gc: bool, found: list[PlanWarning]) -> bool:
    """Offload only where there is device memory to free: transformers 5.24 wraps each
    checkpoint in ``save_on_cpu(pin_memory=True)``, which raises on a machine without an
    accelerator, and on the CPU the activations already live in host memory."""
    if not (gc and ctx.options.activation_offload):
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


def _blocks(ctx: Context, gc: bool) -> tuple[int, int] | None:
    """(blocks checkpointed at a training forward of the model as it stands now, blocks).

    The every-block layout checkpoints them all. The selective layouts (every n-th block, or
    trainable blocks only) apply the frozen-prefix rule (:class:`kbitprep.steps.checkpoint_layouts._FrozenPrefix`):
    the blocks before the first one that a backward reaches build no graph and are not
    checkpointed; from it on, every block of the layout is."""
    blocks = checkpoint_blocks(ctx.base)
    if not gc or not blocks:
        return None
    every = ctx.options.checkpoint_every_n_layers
    first = _first_trainable(ctx, blocks) if _selective(ctx.options) else 0
    return sum(1 for i in range(first, len(blocks)) if i % every == 0), len(blocks)


def _selective(options: Options) -> bool:
    """Whether the layout is selective, so the frozen-prefix rule applies."""
    return options.checkpoint_trainable_blocks_only or options.checkpoint_every_n_layers != 1


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


def plan(ctx: Context) -> CheckpointPlan:
    """Checkpointing on or off, its mode and layout, and the input-grad wiring."""
    found: list[PlanWarning] = []
    gc, reentrant, kept_on = _mode(ctx, found)
    reentrant = _engine_reentrant(ctx, reentrant)
    _check_layout(ctx, gc)
    entries = ckpt.entry_modules(ctx.base) if gc else []
    installs = gc and (bool(reentrant) or ckpt.enable_installs_input_grads(ctx.base))
    hooked = any(ckpt.has_input_grad_hook(m) for _n, m in entries)
    if gc and reentrant and not entries:
        found.append(
            PlanWarning(
                "checkpointing",
                "Reentrant checkpointing was requested but the model has no input embedding module "
                "(get_input_embeddings is missing or fails, and there is no nn.Embedding): adapters inside "
                "checkpointed blocks will get no gradient. Use use_reentrant=False.",
            )
        )
    use_cache = getattr(getattr(ctx.base, "config", None), "use_cache", None)
    kwargs = dict(ctx.options.checkpoint_kwargs)
    if reentrant is not None:
        kwargs["use_reentrant"] = reentrant
    offload = _offload(ctx, gc, found)
    return CheckpointPlan(
        gradient_checkpointing=gc,
        use_reentrant=reentrant,
        input_grad_hook=bool(entries) and (installs or hooked),
        input_grad_modules=tuple(ctx.prefix + n for n, _m in entries) if (installs or hooked) else (),
        use_cache_off=((gc and not kept_on) or ctx.distributed.mode is not None) and use_cache is True,
        checkpoint_kwargs=kwargs,
        activation_offload=offload,
        checkpoint_every_n_layers=ctx.options.checkpoint_every_n_layers if gc else 1,
        checkpoint_trainable_blocks_only=gc and ctx.options.checkpoint_trainable_blocks_only,
        checkpointed_blocks=_blocks(ctx, gc),
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
