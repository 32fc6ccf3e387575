"""Errors a user can cause. The CLI prints these as one line and exits non-zero; tracebacks are for bugs."""
import argparse


class FastmaskError(Exception):
    """Bad input or an unusable environment, explained in one sentence that says what to do."""


class UnknownSettings(FastmaskError):
    """A config file sets names this version has no setting for (a typo, or a run of another fastmask version)."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises FastmaskError instead of printing usage, so bad flags end as the same one-line error."""

    def error(self, message: str):
        raise FastmaskError(message)
