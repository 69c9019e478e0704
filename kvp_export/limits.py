"""Upper bounds on the numbers a user gives: kvp_validate.limits (one table for both packages)."""

from kvp_validate.limits import COUNT, DEFAULT, LENGTH, LIMITS, REPEAT, TOKENS, check_limits, check_tree

__all__ = ["COUNT", "DEFAULT", "LENGTH", "LIMITS", "REPEAT", "TOKENS", "check_limits", "check_tree"]
