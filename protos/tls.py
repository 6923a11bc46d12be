"""TLS for Anvil's gRPC services: server certificates, and optionally mutual TLS between services.

One switch for a whole deployment, like the API key: set the environment of the processes (they inherit
it: `anvil run` and `anvil serve` pass it to every service they start, on this host or through Ray) and
every server and channel speaks TLS.

- `ANVIL_TLS_CERT`, `ANVIL_TLS_KEY`: a server's certificate chain and private key (PEM). With both, every
  gRPC server serves TLS only. `ServerConfig.tls_cert` / `tls_key` set them per server instead.
- `ANVIL_TLS_CLIENT_CA`: with it, a server also *requires* a client certificate signed by this CA
  (mutual TLS): a caller without one fails the handshake.
- `ANVIL_TLS_CA`: the CA a client trusts for servers' certificates. With it, every channel is TLS.
- `ANVIL_TLS_CLIENT_CERT`, `ANVIL_TLS_CLIENT_KEY`: the certificate a client presents (for mutual TLS).

A certificate must name the host clients dial (an IP SAN such as 127.0.0.1 for loopback addresses). The
files are read when a server starts or a channel opens; a path that cannot be read is an error naming
the variable, never a silent fall-back to plain text.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from protos.errors import InvalidArgument

SERVER_CERT, SERVER_KEY, CLIENT_CA = "ANVIL_TLS_CERT", "ANVIL_TLS_KEY", "ANVIL_TLS_CLIENT_CA"
TRUSTED_CA, CLIENT_CERT, CLIENT_KEY = "ANVIL_TLS_CA", "ANVIL_TLS_CLIENT_CERT", "ANVIL_TLS_CLIENT_KEY"
VARIABLES = (SERVER_CERT, SERVER_KEY, CLIENT_CA, TRUSTED_CA, CLIENT_CERT, CLIENT_KEY)


def _read(path: str | Path | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what} {path} cannot be read ({exc.strerror}); fix the path or unset it") from None


def server_credentials(
    cert: str | Path | None = None, key: str | Path | None = None, client_ca: str | Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials for a server (arguments first, then the environment); None: plain text."""
    cert = cert or os.environ.get(SERVER_CERT)
    key = key or os.environ.get(SERVER_KEY)
    client_ca = client_ca or os.environ.get(CLIENT_CA)
    if not cert and not key:
        if client_ca:
            raise InvalidArgument(
                f"{CLIENT_CA} (mutual TLS) needs a server certificate: set {SERVER_CERT} and {SERVER_KEY}"
            )
        return None
    if not (cert and key):
        raise InvalidArgument(f"TLS needs both a certificate and its key: set {SERVER_CERT} and {SERVER_KEY}")
    pair = (_read(key, f"{SERVER_KEY} (the server's key)"), _read(cert, f"{SERVER_CERT} (the server's certificate)"))
    roots = _read(client_ca, f"{CLIENT_CA} (the CA of client certificates)")
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials() -> grpc.ChannelCredentials | None:
    """TLS credentials for a client channel, from the environment; None: plain text."""
    trusted = os.environ.get(TRUSTED_CA)
    cert, key = os.environ.get(CLIENT_CERT), os.environ.get(CLIENT_KEY)
    if not trusted:
        if cert or key:
            raise InvalidArgument(f"a client certificate ({CLIENT_CERT}) is for TLS: set {TRUSTED_CA} too")
        return None
    if bool(cert) != bool(key):
        raise InvalidArgument(f"a client certificate needs its key: set both {CLIENT_CERT} and {CLIENT_KEY}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(trusted, f"{TRUSTED_CA} (the CA clients trust)"),
        private_key=_read(key, f"{CLIENT_KEY} (the client's key)"),
        certificate_chain=_read(cert, f"{CLIENT_CERT} (the client's certificate)"),
    )


def environment() -> dict[str, str]:
    """The TLS variables set in this process (what a launcher passes to the services it starts)."""
    return {name: os.environ[name] for name in VARIABLES if os.environ.get(name)}
