"""One stage, one file: run(...) is the logic, main() the I/O DVC calls (`python -m steps.<stage>`)."""
