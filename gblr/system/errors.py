"""The project's own error for bad input, which ``python run.py`` turns into one ``error:`` line and exit
code 2 (gblr.run.exits). Any other exception is a bug: its traceback is shown and the exit code is 1."""
import functools


class BadInput(ValueError):
    """A setting, a file or a dataset the user gave cannot be used; the message names it, the value
    given and what is allowed."""


class MissingInput(BadInput, FileNotFoundError):
    """A path the user gave (a dataset, pretrained weights, an export) does not exist or lacks a file."""


def checks_input(function):
    """For a function that only checks input: a ValueError raised inside it, by code that knows
    nothing of exit codes (gblr.layers' checks), is bad input."""

    @functools.wraps(function)
    def checked(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BadInput:
            raise
        except ValueError as error:
            raise BadInput(str(error)) from error

    return checked
