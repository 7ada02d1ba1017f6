"""Benchmarks: not run as tests; each prints a table and, last, one JSON line."""
