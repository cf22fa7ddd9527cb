"""``python -m benchmarks``: the same as ``connguard bench`` (see
:mod:`benchmarks.runner`)."""

import sys

from benchmarks.runner import main

if __name__ == "__main__":
    sys.exit(main())
