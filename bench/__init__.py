"""The benchmark suite of aioisolate: ``python -m bench`` (see docs/performance.md)."""
