"""User-facing errors.

Every failure a user can cause (bad path, hash mismatch, invalid option...) raises
`KvpError` with a one-line message; the CLI prints it as `error: ...` and exits 1.
Anything else is a bug and keeps its traceback.
"""

from kvp_validate.errors import KvpError, check_choice

__all__ = ["HashMismatch", "KvpError", "TokenizerMismatch", "UnsupportedArchitecture", "check_choice"]


class HashMismatch(KvpError):
    """A downloaded or cached file does not have the SHA-256 we pinned."""


class UnsupportedArchitecture(KvpError):
    """The model's architecture is not one we know how to handle."""


class TokenizerMismatch(KvpError):
    """Base and auxiliary models do not tokenize text the same way."""
