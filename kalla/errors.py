"""One exception root for Kalla.

HTTP status, CLI exit code, the stage that failed and whether a retry can help are
class attributes, translated to the wire in exactly one place each (the HTTP handler,
the CLI and the callback body). Errors cross process boundaries as plain dicts.
"""
from __future__ import annotations


class KallaError(Exception):
    """Root of every error Kalla raises on purpose."""

    status = 500          # HTTP status when this reaches the API
    exit_code = 1         # bin/kalla-run exit status
    stage = None          # pipeline stage name, when known
    retryable = False     # would running the same job again possibly help?

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(message)
        self.message = message
        if stage is not None:
            self.stage = stage

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__, "message": self.message,
                "stage": self.stage, "retryable": self.retryable}

    @classmethod
    def from_dict(cls, data: dict) -> "KallaError":
        kind = _KINDS.get(data.get("kind"), KallaError)
        err = kind.__new__(kind)
        KallaError.__init__(err, data.get("message", "unknown error"), stage=data.get("stage"))
        return err


class InvalidInput(KallaError):
    """The request itself is wrong; the message names the field."""
    status = 400
    exit_code = 2
    field = None

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class ConfigError(KallaError):
    """A KALLA_* setting is invalid; raised once at start-up."""
    exit_code = 2


class SourceError(KallaError):
    """A source could not be read (connection, permissions, missing object...)."""
    stage = "staging"


class TransientSourceError(SourceError):
    retryable = True


class MatchError(KallaError):
    """match_sql was refused, failed to plan, or failed to run."""
    stage = "matching"


class OutputError(KallaError):
    """Writing or publishing the output files failed."""
    stage = "publish"


class JobCancelled(KallaError):
    status = 409


class WorkerDied(KallaError):
    retryable = True


_KINDS = {c.__name__: c for c in (KallaError, InvalidInput, ConfigError, SourceError,
                                  TransientSourceError, MatchError, OutputError,
                                  JobCancelled, WorkerDied)}
