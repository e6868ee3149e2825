"""The preparation steps, in the order they run:

``resolve`` (backend and inventory) → ``distributed`` (engine and its dtype) → ``trainability``
(the backend's refusal, findings and fix-ups) → ``freeze`` → ``cast`` → ``compute`` (compute-dtype
rules, applied at use) → ``checkpoint``.

Each step module has ``plan(...) -> <Step>Plan``, a frozen dataclass whose fields are fields of
:class:`~kbitprep.PreparationPlan` (each owned by one step) plus the step's warnings, and
``apply(model, plan, log)``, which applies that step's part of the plan and records its undo.
:func:`kbitprep.steps.run.plan_steps` composes the plan; :func:`~kbitprep.steps.run.apply_steps`
applies it and nothing else.
"""
