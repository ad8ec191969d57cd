"""Errors a user can cause: printed as one clear message, without a stack trace."""


class KdlmError(Exception):
    """A problem with the user's input (config, files, models, data) that says what to do.

    The CLI prints these as a single message and exits with status 2; anything else is a bug
    and keeps its traceback.
    """
