"""connguard's benchmarks, in the repository only (not in the wheel): ``connguard bench`` and
``python -m benchmarks`` run them from a checkout (see README.md here and docs/bench.md)."""
