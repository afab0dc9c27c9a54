"""pytest-mbridge: a conformance suite for HF <-> Megatron-Core bridges, as a pytest plugin."""
