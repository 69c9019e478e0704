"""`python -m kvp_export VERB ...` (and `torchrun -m kvp_export train ...`): the `kvp` CLI."""

from .cli import main

main()
