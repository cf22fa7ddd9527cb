"""OS resource guard (placeholder interface; the full guard lands with issue 4)."""

from __future__ import annotations


class ResourceGuard:
    """Refuses a new connection before the kernel would: fds and ephemeral ports."""

    def __init__(self, host: str, port: int, **options: object) -> None:
        self.host = host
        self.port = port

    def preflight(self) -> None:
        """Raise FdLimitReached / LocalPortsExhausted if a connect would exhaust a limit."""
