"""The coordinator's dashboard: static pages that read the JSON API, mounted next to it.

`mount_dashboard(app, ...)` adds the dashboard's own JSON endpoints (timeline, validation,
weights, submissions, generate), serves the single-page UI at `/` and its files under
`/static`. Charts use uPlot (MIT), vendored in `static/vendor/`: the pages work offline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from trainer.dashboard.routes import create_router
from trainer.dashboard.rows import NodeIndex
from trainer.dashboard.series import SampleLog
from trainer.view import PoolView

STATIC = Path(__file__).parent / "static"


def mount_dashboard(
    app: FastAPI,
    view: PoolView,
    samples: SampleLog,
    nodes: NodeIndex,
    is_operator: Callable[..., bool],
) -> None:
    """Serve the dashboard at `/` and its API on `app` (`samples` and `nodes` are the caches
    the API's own endpoints use too; `is_operator` its token check, as a dependency)."""
    app.include_router(create_router(view, samples, nodes, is_operator))
    app.mount("/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})
