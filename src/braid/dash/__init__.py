"""braid.dash: a live dashboard over a run root (`braid dash`): the registry's runs and, for the
runs picked, their metrics drawn with Plotly while they train.

Contract: `require_extras()` raises BraidError with the install line when the optional `dash`
dependencies (flask, plotly) are missing; `app.create_app(root)` is the web app and
`app.serve(root, host, port, allow_remote=...)` runs it. data.py does the reading; static/ holds
the page. Importing this package imports neither flask nor plotly.
"""

from __future__ import annotations

import importlib

from braid.errors import BraidError

EXTRAS = ("flask", "plotly")


def require_extras() -> None:
    """BraidError naming `pip install braid[dash]` when flask or plotly cannot be imported."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BraidError(
            f"braid dash needs {' and '.join(missing)}, not installed: pip install braid[dash]"
        )
