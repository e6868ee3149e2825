"""``python -m kbitprep``: the same program as the ``kbitprep`` console script."""

from __future__ import annotations

from kbitprep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
