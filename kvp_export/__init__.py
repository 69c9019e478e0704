"""kvp-export: KV Prediction (Horton et al., 2024) from base model to validated graphs.

Pipeline: models (sources) -> derive (auxiliary model) -> predictor (fit) -> runtime
(KVP generation) -> evaluate (quality metrics). Each stage is a function here and a
`kvp` CLI verb.
"""

from kvp_validate._version import __version__  # one version for kvp-export and kvp-validate

__all__ = ["__version__"]
