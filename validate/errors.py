"""User-facing errors of the validator.

kvp_validate cannot import kvp_export (that pulls in torch), so it has its own class with the
same convention as `kvp_export.errors.KvpError`: a one-line message, printed as `error: ...`.
"""


class ValidationError(Exception):
    """A clear, one-line error caused by the caller's input (bad limit, unknown task id...)."""

    exit_code = 1
