"""What the validator measures when not told otherwise, in one place: `kvp-validate` (and
`kvp validate`) show these as their option defaults, `validate_onnx` takes them as its
argument defaults, and a recipe's `validate` section (kvp_export/recipe.py) starts from them.
Torch- and onnxruntime-free, so the recipe can import it."""

from __future__ import annotations

CHECKS = ("parity", "quality", "ttft", "coldstart", "humaneval")
DEFAULT_CHECKS = ("parity", "quality", "ttft", "coldstart")
THREADS = 2  # onnxruntime intra-op threads (fixed for TTFT)
GREEDY_TOKENS = 16
LENGTHS = (128, 512, 1024)  # TTFT prompt lengths
BATCHES = (1,)  # TTFT batch sizes (what every shipped recipe measures; larger batches on request)
WARMUP = 1
REPEATS = 5
COLDSTART_LENGTHS = (128, 512)  # a fresh process per path and length (batch 1)
COLDSTART_RUNS = 1  # fresh processes per point (median)
