"""The coordinator's dashboard: static pages that read the JSON API, mounted next to it.

`mount_dashboard(app, coord)` adds the dashboard's own JSON endpoints (timeline, validation,
weights, submissions, generate), serves the single-page UI at `/` and its files under
`/static`. Charts use uPlot (MIT), vendored in `static/vendor/`: the pages work offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from trainer.dashboard.routes import create_router

if TYPE_CHECKING:
    from trainer.coordinator import Coordinator

STATIC = Path(__file__).parent / "static"


def mount_dashboard(app: FastAPI, coord: Coordinator) -> None:
    """Serve the dashboard at `/` and its API on `app`."""
    origin = getattr(coord, "origin", None)
    served = origin.app.state.served if origin is not None else None
    app.include_router(create_router(coord, served))
    app.mount("/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})
