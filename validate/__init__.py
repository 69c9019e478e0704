"""kvp_validate: checks and reports on exported KVP artifacts.

Installed as `kvp_validate` (the folder is validate/). Imports no torch: a CI job that
validates graphs installs only the runtimes, numpy, tokenizers, click and pydantic.
"""

from ._version import __version__  # noqa: E402,F401
