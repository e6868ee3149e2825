"""The preparation steps, in the order they run:

``resolve`` (backend and inventory) → ``distributed`` (engine and its dtype) → ``trainability``
(the backend's refusal, findings and fix-ups) → ``freeze`` → ``cast`` → ``compute`` (compute-dtype
rules, applied at use) → ``checkpoint``.

Each step module has a planner ``plan_<step>(ctx, ..., <the options it reads>) -> <Step>Plan``
(``plan_backend``, ``plan_distributed``, ``plan_trainability``, ``plan_freeze``, ``plan_casts``,
``plan_compute``, ``plan_checkpointing``), returning a frozen dataclass whose fields are fields of
:class:`~kbitprep.PreparationPlan` (each owned by one step) plus the step's warnings, and, for the
steps that change the model, ``apply(model, plan, log)``, which applies that step's part of the
plan and records its undo. Each option of :func:`kbitprep.plan` is an argument of the planners
that read it, so following one through the code needs no options object. :func:`kbitprep.plan`
runs the planners and :func:`~kbitprep.steps.run.compose` makes the plan;
:func:`~kbitprep.steps.run.apply_steps` applies it and nothing else.
"""
