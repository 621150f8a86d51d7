"""Continuous batching, sampling and detokenization: no Triton, no torch."""
