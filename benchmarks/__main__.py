"""``python -m benchmarks``: ``python -m connguard.bench`` (the same as ``connguard bench``)."""

from connguard.bench.runner import main

raise SystemExit(main())
