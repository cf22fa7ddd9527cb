"""The ``connguard`` command.  Subcommands: ``doctor``, ``bench`` and ``explain`` (more plug
in here).

Only argument parsing and printing live here; the report itself is :mod:`connguard.doctor`.
Exit status: 0 when nothing is red, 1 when a check is red, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import importlib
import json
import os
import sys
from types import ModuleType
from typing import Any, Callable, Iterable, List, Optional, Sequence, TextIO, Tuple

from connguard import doctor
from connguard.doctor import RED, Check, Report, Target

EXIT_OK, EXIT_RED, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connguard", description="Client-side guard for MySQL/MariaDB connections.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    add_doctor(commands)
    add_bench(commands)
    add_explain(commands)
    return parser


def _version() -> str:
    from connguard import __version__
    return f"connguard {__version__}"


def add_doctor(commands: Any) -> None:
    """Register ``connguard doctor`` on the subparsers object ``commands``."""
    parser = commands.add_parser(
        "doctor", help="check this host's limits and a server's connection settings",
        description="Report fd limits, ephemeral ports, sockets toward the server and the "
        "server's connection settings, each with a verdict (green/yellow/red). Exit status "
        "1 when a check is red. The password is never printed.")
    parser.add_argument("--dsn", help="mysql://user[:password]@host[:port][/db]; the password "
                        "may instead come from MYSQL_PWD or --password-prompt")
    parser.add_argument("--socket", metavar="PATH", help="connect over this unix socket")
    parser.add_argument("--password-prompt", action="store_true",
                        help="ask for the password on the terminal")
    parser.add_argument("--pid", type=int, help="report the fd limits of this process (e.g. "
                        "your service) instead of the doctor's own")
    parser.add_argument("--json", action="store_true",
                        help="print JSON (its keys: the doctor page of the docs)")
    parser.set_defaults(handler=run_doctor, parser=parser)


def add_bench(commands: Any) -> None:
    """Register ``connguard bench``. Its options and handler are the runner's
    (:mod:`benchmarks.runner`, in a checkout of the repository, not in the wheel), added when
    the command is parsed: the other commands never import the benchmarks."""
    commands.add_parser(
        "bench", help="compare connguard with plain PyMySQL, SQLAlchemy and DBUtils here "
        "(from a checkout)",
        description="Run the benchmark scenarios, every client side by side, against a "
        "throwaway MariaDB (the mariadbd on PATH) or --dsn; write results.json, report.md "
        "and PNG charts into --out and print a summary table (docs/bench.md in the source "
        "tree explains every field). Runs from a checkout of the repository (pip install -e "
        "'.[bench]'). Exit status 1 when a scenario failed, 2 on a usage error or when there "
        "is no server.", fill=_bench_options)


def _bench_options(parser: argparse.ArgumentParser) -> None:
    runner = _bench_runner(parser)
    runner.add_arguments(parser)
    parser.set_defaults(handler=runner.run_from_args, parser=parser)


def checkout_root(package_dir: str) -> Optional[str]:
    """The checkout that holds this connguard package, when ``benchmarks/`` sits beside it
    (an editable install or a source tree on the path); None for an installed wheel. The
    checkout's pyproject.toml says it is one: in site-packages a ``benchmarks/`` beside the
    package is another distribution's (some wheels ship one), never to be run."""
    root = os.path.dirname(os.path.abspath(package_dir))
    marks = (os.path.join(root, "benchmarks", "runner.py"), os.path.join(root, "pyproject.toml"))
    return root if all(os.path.isfile(mark) for mark in marks) else None


def _bench_runner(parser: argparse.ArgumentParser) -> ModuleType:
    """:mod:`benchmarks.runner` from this connguard's own checkout (an editable install does
    not put the checkout on ``sys.path``, so it is added); exit 2 without one."""
    import connguard

    root = checkout_root(os.path.dirname(connguard.__file__))
    if root is None:
        parser.exit(EXIT_USAGE, f"{parser.prog}: the benchmarks are not part of the installed "
                    "package; they run from a checkout of the connguard repository: there, "
                    "pip install -e '.[bench]' and run connguard bench (or python -m "
                    "benchmarks)\n")
    if not sys.path or os.path.abspath(sys.path[0] or os.curdir) != root:
        sys.path.insert(0, root)  # first: the benchmarks that match this connguard, no other
    try:
        return importlib.import_module("benchmarks.runner")
    except ImportError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: cannot import the benchmarks from {root} "
                    f"({exc})\n")


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser whose options may come from a module loaded on first use:
    ``fill(parser)`` runs once, when the command line names this command (help included)."""

    def __init__(self, *args: Any,
                 fill: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fill = fill

    def parse_known_args(self, args: Optional[Iterable[str]] = None,
                         namespace: Any = None) -> Tuple[Any, List[str]]:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)
        return super().parse_known_args(args, namespace)


def add_explain(commands: Any) -> None:
    """Register ``connguard explain`` (the pages: :mod:`connguard.explain`)."""
    parser = commands.add_parser(
        "explain", help="print the page about an error (the name its message gives)",
        description="Print the page about a connguard error: why it happens, how to confirm "
        "it, how to fix it. The name is the one in the error's `see:` line (also its .docs "
        "attribute). Without a name, list the pages.")
    parser.add_argument("name", nargs="?", help="e.g. access-denied")
    parser.set_defaults(handler=run_explain, parser=parser)


def run_explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from connguard import explain

    if args.name is None:
        sys.stdout.write("connguard explain NAME prints one of these pages:\n")
        sys.stdout.writelines(f"  {name}\n" for name in explain.names())
        return EXIT_OK
    try:
        text = explain.page(args.name)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Handler = args.handler
        return handler(args, args.parser)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except BrokenPipeError:
        # `connguard doctor | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RED


# --- doctor ---------------------------------------------------------------------------------


def run_doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.pid is not None and not _process_exists(args.pid):
        parser.error(f"--pid {args.pid}: no such process")
    target = _target(args, parser)
    report = doctor.diagnose(target, pid=args.pid)
    out = sys.stdout
    if args.json:
        json.dump(report.as_json(), out, indent=2)
        out.write("\n")
    else:
        write_report(report, out)
    return EXIT_RED if report.worst == RED else EXIT_OK


def _has_terminal() -> bool:
    return sys.stdin.isatty()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's process (or a number no process can have)
    return pid > 0


def _target(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Optional[Target]:
    """The server to examine from --dsn/--socket, with the password from its sources."""
    if not args.dsn and not args.socket:
        return None
    try:
        target = doctor.parse_dsn(args.dsn) if args.dsn else Target()
    except ValueError as exc:
        parser.error(f"--dsn: {exc}")
    if target.ignored:
        sys.stderr.write(f"note: --dsn: ignoring {', '.join(target.ignored)}: for SQLAlchemy "
                         "and the connguard plugin, not the server (the doctor connects with "
                         "PyMySQL)\n")
    if args.socket:
        target = dataclasses.replace(target, unix_socket=args.socket)
    return dataclasses.replace(target, password=_password(args, target, parser))


def _password(args: argparse.Namespace, target: Target,
              parser: argparse.ArgumentParser) -> Optional[str]:
    """--password-prompt, else the DSN's, else MYSQL_PWD (as the mysql client reads it)."""
    if args.password_prompt:
        if not _has_terminal():
            parser.error("--password-prompt needs a terminal; give the password through "
                         "MYSQL_PWD instead")
        try:
            return getpass.getpass(f"Password for {target.describe()}: ")
        except (EOFError, KeyboardInterrupt):
            sys.stderr.write("\n")
            parser.error("no password entered (set MYSQL_PWD instead to run without a "
                         "prompt)")
    if target.password is not None:
        return target.password
    return os.environ.get("MYSQL_PWD")


# --- plain-text tables ------------------------------------------------------------------------

_TITLES = {"host": "Host (fd limits of {process}{pid_hint})",
           "sockets": "Sockets toward {address} (every process on this host)",
           "server": "Server {target}"}


def write_report(report: Report, out: TextIO) -> None:
    target = report.target
    where = target.describe() if target else "this host"
    pid = report.process.get("pid")
    names = {"target": where, "process": f"pid {pid}",
             "pid_hint": "; --pid PID for a service's" if pid == os.getpid() else "",
             "address": target.address() if target else ""}
    out.write(f"connguard doctor: {where}\n")
    for section, title in _TITLES.items():
        rows = [c for c in report.checks if c.section == section]
        if rows:
            out.write("\n" + title.format(**names) + "\n")
            out.writelines(line + "\n" for line in table(rows))
    out.write("\n" + summary(report.checks) + "\n")


def table(rows: List[Check]) -> List[str]:
    """Aligned columns: check, value, verdict, note."""
    cells = [(c.name, _text(c.value), c.verdict.upper(), c.note) for c in rows]
    header = ("check", "value", "verdict", "note")
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(3)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
            for row in [header, *cells]]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summary(checks: List[Check]) -> str:
    counts = {v: sum(1 for c in checks if c.verdict == v) for v in doctor.VERDICTS}
    status = EXIT_RED if counts[RED] else EXIT_OK
    return (f"{counts[RED]} red, {counts['yellow']} yellow, {counts['green']} green "
            f"(exit status {status})")


if __name__ == "__main__":
    sys.exit(main())
