"""The tiny random test model of each supported family: its config fields beside the common
ones (conftest.tiny_model). Every family registered in kvp_export/models/adapters/ needs an
entry here: test_families.py fails otherwise, and runs each one through the whole toolchain."""

TINY: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    # sliding window 8 (bites at the tests' 40-token prompts), every 2nd layer global, a scale
    # and a local RoPE base that differ from the defaults (a mix-up shows)
    "gemma3_text": {"sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
                    "rope_local_base_freq": 100.0},
}
