"""The GPU conformance suite (issue 12, item 7): slices on a real NVIDIA GPU, run by ``make gpu-check``."""
