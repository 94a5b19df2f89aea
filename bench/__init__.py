"""Benchmarks for pypooler. They print numbers and never assert; see bench/README.md."""
