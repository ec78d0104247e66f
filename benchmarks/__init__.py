"""Benchmarks of flax-fm (python -m benchmarks.<name>)."""
