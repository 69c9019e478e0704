"""The tiny random test model of each supported family: its config fields beside the common
ones (conftest.tiny_model). Every family registered in kvp_export/models/adapters/ needs an
entry here: test_families.py fails otherwise, and runs each one through the whole toolchain."""

TINY: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
}
