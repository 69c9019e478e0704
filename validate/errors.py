"""The one user-facing error class, shared by kvp_export and kvp_validate.

Defined here because the validator must import without torch; kvp_export re-exports it
as `kvp_export.errors.KvpError`. Every failure a user can cause raises it with a one-line
message; both CLIs print it as `error: ...` and exit 1.
"""


class KvpError(Exception):
    """A clear, one-line error caused by the user's input or environment."""

    exit_code = 1


ValidationError = KvpError  # the validator's name for it


def check_at_least(minimum: int, **values: int) -> None:
    """Refuse any of `values` below `minimum`, each named as the CLIs spell it (`max_new_tokens`
    reads "max-new-tokens")."""
    for name, v in values.items():
        if v < minimum:
            raise KvpError(f"{name.replace('_', '-')} must be >= {minimum}, got {v}")


def check_choice(what: str, value, choices) -> None:
    """Refuse `value` unless it is one of `choices` (any container of names), in one line that
    lists them: the one wording for an unknown name across both packages."""
    if value not in choices:
        raise KvpError(f"unknown {what} '{value}' (choose from {', '.join(map(str, choices))})")
