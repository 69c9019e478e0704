"""The entry point: `python -m kvp_export VERB ...` (and `torchrun -m kvp_export train ...`)
runs the `kvp` CLI with every verb registered."""

from .cli import main

if __name__ == "__main__":
    main()
