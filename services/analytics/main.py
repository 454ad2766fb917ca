"""`tokenrelay analytics`: the faust worker in the foreground."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.settings import Settings

log = logging.getLogger(__name__)


def run_analytics(settings: Settings) -> int:
    """Ensure the topics, then run the faust worker until SIGINT/SIGTERM; returns an exit code."""

    from services.analytics.app import changelog_specs, create_app
    from services.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    asyncio.run(ensure_topics(settings, specs=changelog_specs(settings)))
    app = create_app(settings)
    (settings.cache_dir / "analytics").mkdir(parents=True, exist_ok=True)
    worker = _worker_class()(app, settings, loglevel=settings.log_level.upper(), quiet=True)
    log.info("analytics on http://%s:%d/", settings.gateway_host, settings.analytics_port)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    return 0


def _worker_class() -> type[Any]:
    """faust's Worker, with our log format and repeat limit on the handlers it sets up before anything logs."""
    import faust

    from services.logs import adopt_handlers

    class Worker(faust.Worker):
        def __init__(self, app: Any, settings: Settings, **options: Any) -> None:
            super().__init__(app, **options)
            self.tokenrelay_settings = settings

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            if self.tokenrelay_settings.log_format.lower() == "json":
                self.spinner = None  # its cursor codes would land between the JSON lines
            super().on_setup_root_logger(logger, level)
            adopt_handlers(self.tokenrelay_settings, logger.handlers)

    return Worker
