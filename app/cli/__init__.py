"""The ``keel`` command line: one entry point (:func:`app.cli.main.main`) with a sub-command group per
capability. Like the API, it sits on top of every feature and is the only other place that builds them."""

from app.cli.main import app, main

__all__ = ["app", "main"]
