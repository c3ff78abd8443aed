"""What every upstream connection starts with: the TLS context and the TCP connection.

`tls_context` builds the trust for a server (system CAs plus `ca_file`, the name
checked, TLS 1.2 or newer), shared by SMTP and POP before SMTP; `tcp_connect` opens
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
