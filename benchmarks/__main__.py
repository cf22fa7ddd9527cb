"""``python -m benchmarks [--quick] [--out DIR]``: every scenario, every client, one run.

Starts a throwaway MariaDB with the test suite's harness and stops it afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

from benchmarks import census_cost, pool_overhead, sqlalchemy_plugin
from benchmarks.common import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    parser.add_argument("--out", default="bench-results", help="directory for the report")
    args = parser.parse_args(argv)

    from connguard.sandbox import MariaDB, Template

    root = tempfile.mkdtemp(prefix="connguard-bench-")
    try:
        import os
        os.chmod(root, 0o755)
        template = Template(root)
        template.build()
        server = MariaDB(template, {"max_connections": 500}).start()
        try:
            version = server.variable("version")
            kwargs = server.connect_kwargs()
            results = pool_overhead.run_all(kwargs, args.quick)
            results += census_cost.run_all(kwargs, args.quick)
            results += sqlalchemy_plugin.run_all(kwargs, args.quick)
        finally:
            server.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(write_report(results, args.out, version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
