"""Errors that the CLI reports as one line, without a traceback."""


class ConfigError(ValueError):
    """A bad value in the configuration; the message names it and the allowed ones."""
