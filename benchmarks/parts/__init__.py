"""The parts of ``benchmarks/run.py``, one module each; each ``run`` appends its rows to ``rows``
and its per-part record to ``info`` (``run.py`` tags the rows with the part and writes the files).

- ``import_time``: the ``import`` part;
- ``prepare``: the ``prepare`` part;
- ``training``: the ``training`` part (issue 11);
- ``checkpointing``: the ``checkpointing`` part (issue 13);
- ``options``: the ``options`` part (issue 16), the rows of what ``benchmarks/options.py`` and
  ``benchmarks/overhead.py`` measure.
"""
