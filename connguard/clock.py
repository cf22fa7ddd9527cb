"""The injectable time sources: every policy and gate takes a ``Clock`` (default
``time.monotonic``: all timing is monotonic) and, where it waits, a ``Sleep`` (default
``time.sleep``), so tests drive them with a fake clock instead of waiting."""

from typing import Callable

Clock = Callable[[], float]
Sleep = Callable[[float], None]
