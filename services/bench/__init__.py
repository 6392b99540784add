"""Benchmarks behind `omni bench ...`: each module has `main(argv)` and prints a table."""
