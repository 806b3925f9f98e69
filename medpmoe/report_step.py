"""One optional reporting step (a figure, an upload, a baseline) that warns instead of failing the run."""

from __future__ import annotations

import logging

from medpmoe.files import shown

logger = logging.getLogger(__name__)


def reporting_step(what: str, step, /, *args, **kwargs):
    """`step(*args, **kwargs)`, or None after a warning naming `what` when it fails: a figure, a heatmap or an
    upload never fails the run whose results it illustrates (metrics and results are written whatever happens)."""
    try:
        return step(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 (any failure of a report step is a warning)
        logger.warning("%s skipped: %s: %s", what, type(err).__name__, shown(str(err).splitlines()[0] if str(err)
                                                                              else ""))
        return None
