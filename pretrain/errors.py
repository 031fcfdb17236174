"""Errors that end a run on purpose, with a message meant for the user (no traceback needed)."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """The run stopped itself: too many bad samples, non-finite steps or failed checkpoints.

    Raised on every rank together; the launchers print the message once and exit with code 3.
    The latest complete checkpoint is intact, so fixing the cause and relaunching resumes.
    """


class ConfigError(ValueError):
    """A recipe, override or DeepSpeed config is invalid; the message names the field or file."""
