"""Benchmarks: each runs the fast path and its naive baseline side by side in one process, prints a table and,
with ``--json``, one JSON object on its last line. Speed and memory goals live here, never in unit tests."""
