"""Benchmarks of postsense (run them all with ``python -m bench``; see BENCHMARKS.md)."""
