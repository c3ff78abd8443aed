"""What every upstream connection starts with: the TLS context and the TCP connection.

`tls_context` builds the trust for a server (system CAs plus `ca_file`, the name
checked, TLS 1.2 or newer), shared by SMTP and POP before SMTP. Building one reads
the whole system trust store (tens of milliseconds of CPU), so a pool keeps its
server's in a `TlsContexts`, built again only when the CA file changes. `tcp_connect` opens
the TCP connection itself, so that the SMTP session can tell a connect timeout from
a server that connected but never greeted.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from relay.errors import TemporaryFailure
from relay.settings import ServerSettings, file_error


def tls_context(server: ServerSettings, ca_file: Path | None = None,
                key: str = "ca_file") -> ssl.SSLContext:
    """System trust (plus `ca_file`, else the server's ca_file), the server's name checked,
    TLS 1.2 or newer. The POP connection passes `pop_before_smtp.ca_file`.

    A CA file that cannot be read (removed after the configuration was checked) raises
    TemporaryFailure naming `key` and the path, never a bare OSError."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    extra = ca_file or server.ca_file
    if extra is not None:
        try:
            context.load_verify_locations(cafile=str(extra))
        except OSError as e:  # ssl.SSLError too: not PEM
            problem = file_error(e) if not isinstance(e, ssl.SSLError) else \
                f"not a PEM CA certificate ({e.reason or e}); export the CA as PEM"
            raise TemporaryFailure(f"{key} = {str(extra)!r}: {problem}",
                                   stage="TLS setup") from None
    if not server.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsContexts:
    """One server's TLS context, made once and reused by every session: made again when
    its `ca_file` changes on disk (a renewed CA is used without a reload) or went away
    (then `tls_context` raises what it says)."""

    def __init__(self, server: ServerSettings, key: str) -> None:
        self.server = server
        self.key = key
        self._made: tuple[tuple[int, int, int] | None, ssl.SSLContext] | None = None

    def get(self) -> ssl.SSLContext:
        stamp = _stamp(self.server.ca_file)
        if self._made is None or self._made[0] != stamp or stamp == _MISSING:
            self._made = (stamp, tls_context(self.server, key=self.key))
        return self._made[1]


_MISSING = (-1, -1, -1)


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return _MISSING
    return info.st_ino, info.st_mtime_ns, info.st_size


async def tcp_connect(host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket to the first address of `host` that answers.

    Raises socket.gaierror (the name does not resolve) or the last address's OSError.
    The caller bounds the time."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except BaseException as e:
            sock.close()
            if not isinstance(e, OSError):
                raise
            error = e
            continue
        return sock
    raise error
