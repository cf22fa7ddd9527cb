"""The benchmarks live in :mod:`connguard.bench` (shipped, for ``connguard bench``); this
package, in the repository only, keeps ``python -m benchmarks`` working from a checkout."""
