"""Errors that end a run with a one-line message (exit code 1); bad items are recorded, not raised."""

from __future__ import annotations


class PipelineError(Exception):
    """A fatal problem the user can act on; the message says what and what to do."""


class CacheMismatchError(PipelineError):
    """A cached store does not match its files or what is asked for.

    missing: there is no store at all. differing: the identity and source fields that differ from
    the request, and made_by: the sidecar that says what made the store (both only for that case),
    so the caller can name the flags that would reuse it.
    """

    def __init__(self, message: str, *, missing: bool = False, differing: tuple[str, ...] = (),
                 made_by: object = None) -> None:
        super().__init__(message)
        self.missing, self.differing, self.made_by = missing, differing, made_by


class UsageError(PipelineError):
    """A request that cannot work as given (a missing optional package, a format an engine does not
    read), found after parsing: exit code 2, like a bad flag."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors often add paragraphs of advice)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
