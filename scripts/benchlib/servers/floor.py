"""The interpreter floor: what any Python server started per connection pays before its greeting."""

from __future__ import annotations

from benchlib.servers.base import Server, free_port, inetd_command


class Floor(Server):
    """The interpreter floor: the same Python, started the same way, writes a greeting and exits."""

    name = "floor"

    def __init__(self, tool: str, python: str) -> None:
        self.port = free_port()
        code = "import os; os.write(1, b'+OK floor\\r\\n'); os.read(0, 100)"
        self._spawn(inetd_command(tool, self.port, [python, "-I", "-c", code]))
