"""Where a server listens: a TCP host and port (`--host`, `--port`), or a Unix domain socket
(`--uds PATH`, or `--host unix:PATH`), and how each is written for grpc, for logs and for the ready line."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Endpoint:
    host: str = ""
    port: int = 0
    path: str | None = None  # absolute path of the Unix socket; host and port are unused then

    @classmethod
    def tcp(cls, host: str, port: int) -> "Endpoint":
        return cls(host=host, port=port)

    @classmethod
    def unix(cls, path: str) -> "Endpoint":
        return cls(path=path)

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def target(self) -> str:
        """grpc's form of the address, for a server's add_insecure_port and a client's channel alike:
        `unix:/path`, `host:port` or `[v6]:port`."""
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def ready_field(self) -> str:
        """The ready line's field that says where to connect: `port=<port>` or `uds=<path>`. A parser that
        knows only `port=` finds none in the second, so it cannot mistake a socket for a TCP port."""
        return f"uds={self.path}" if self.path is not None else f"port={self.port}"

    @property
    def ready_file_text(self) -> str:
        """What $SNAKEPIT_READY_FILE holds: the port, or the socket's absolute path."""
        return self.path if self.path is not None else str(self.port)

    def with_port(self, port: int) -> "Endpoint":
        return replace(self, port=port)

    def __str__(self) -> str:
        return self.target
