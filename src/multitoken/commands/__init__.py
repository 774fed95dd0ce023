"""Command-line front ends of library modules: argument parsing, printing, streaming text.

Each module has `build_parser()` and `main(argv) -> int`, run by `multitoken.cli`. The library
code they call (e.g. `multitoken.decoding`) parses no arguments and prints nothing.
"""
