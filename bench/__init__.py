"""The autoexport benchmark suite: ``python -m bench`` (see BENCHMARKS.md)."""
