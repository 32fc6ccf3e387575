"""Errors a user can cause. The CLI prints these as one line and exits non-zero; tracebacks are for bugs."""


class FastmaskError(Exception):
    """Bad input or an unusable environment, explained in one sentence that says what to do."""
