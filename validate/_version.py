"""The version of kvp-export and kvp-validate (both distributions read it from here)."""

__version__ = "0.3.2"
