"""Benchmarks behind `multitoken bench ...`: each module has `main(argv) -> int`."""
