"""Pieces several benchmarks (and tests) use: JSON records, a one-process engine, the host-read probe."""
