"""Core ML export for the Apple Neural Engine (export.py; the modules it converts: stateful.py)."""

from kvp_validate.mlpackage import coremltools

ct = coremltools()
