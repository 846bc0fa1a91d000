"""Errors that the CLI reports as one line, without a traceback."""


class ConfigError(ValueError):
    """A bad value in the configuration; the message names it and the allowed ones."""


class RunError(RuntimeError):
    """A run that could not go on for a reason outside it (a full disk, too little memory):
    the message says what happened and what to do; the run's summary says ``failed``."""


def shorten(value: str, keep: int = 60, limit: int = 300) -> str:
    """A value cut for an error line (a 5000-character override) when longer than
    ``limit``: its head, its length, its tail."""
    if len(value) <= limit:
        return value
    return f"{value[:keep]}...({len(value)} characters)...{value[-keep // 3 :]}"
