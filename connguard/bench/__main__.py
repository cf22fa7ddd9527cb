"""``python -m connguard.bench``: the same as ``connguard bench`` (see
:mod:`connguard.bench.runner`)."""

import sys

from connguard.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
