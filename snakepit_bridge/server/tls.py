"""TLS for a server's TCP port: `--tls-cert PATH --tls-key PATH [--tls-client-ca PATH]`.

The files are read and checked once, when the flags are parsed, so that every mistake (a missing
half, an unreadable or garbled PEM file, a key that is not the certificate's) is a start-up error
that names its flag, before any adapter code runs. Both transports then serve from the bytes read
here: grpcio through `grpc.ssl_server_credentials`, grpclib through `server_ssl_context()` (ALPN h2).

`--tls-client-ca` turns on mutual TLS: every client must present a certificate that this CA signed.
TLS is for TCP only: a Unix socket (`--uds`) is reachable from this host alone and guarded by its
file mode (0600), so the flags refuse the two together instead of adding a handshake that protects
nothing more.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# "-----BEGIN PRIVATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----", ...
PEM_PRIVATE_KEY = b"PRIVATE KEY-----"
PEM_ENCRYPTED_KEY = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


class TlsConfigError(ValueError):
    """A --tls-* flag that cannot be served; the message names the flag."""


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM bytes), and for mTLS the CA its clients must be signed by."""

    cert_path: str
    key_path: str
    cert_chain: bytes
    private_key: bytes
    client_ca_path: str | None = None
    client_ca: bytes | None = None

    @property
    def requires_client_cert(self) -> bool:
        return self.client_ca is not None

    def describe(self) -> str:
        """For the start-up log: what a client must do to connect."""
        if self.client_ca_path is None:
            return f"TLS on (certificate {self.cert_path}); clients need no certificate"
        return (f"TLS on (certificate {self.cert_path}); mTLS: client certificates required, "
                f"verified against {self.client_ca_path}")

    def server_ssl_context(self) -> ssl.SSLContext:
        """An `ssl.SSLContext` for a server socket: TLS 1.2 or later (HTTP/2 forbids older), ALPN `h2`."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        context.set_alpn_protocols(["h2"])
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
        return context


def load_server_tls(cert_path: str | None, key_path: str | None, client_ca_path: str | None) -> ServerTls | None:
    """The server's TLS from the three flags (None when none is given); TlsConfigError names the bad one."""
    if cert_path is None and key_path is None:
        if client_ca_path is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are asked "
                                 "for only in a TLS handshake")
        return None
    if key_path is None:
        raise TlsConfigError("--tls-cert needs --tls-key (the certificate's private key, PEM)")
    if cert_path is None:
        raise TlsConfigError("--tls-key needs --tls-cert (the server's certificate chain, PEM)")
    cert_chain = _read_certificates("--tls-cert", cert_path)
    private_key = _read("--tls-key", key_path)
    if PEM_ENCRYPTED_KEY in private_key:
        raise TlsConfigError(f"--tls-key {key_path}: the key is encrypted (has a passphrase); give an "
                             "unencrypted PEM key, readable by this user only")
    if PEM_PRIVATE_KEY not in private_key:
        raise TlsConfigError(f"--tls-key {key_path}: not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----')")
    _check_key_matches(cert_path, key_path)
    client_ca = _read_certificates("--tls-client-ca", client_ca_path) if client_ca_path is not None else None
    return ServerTls(cert_path, key_path, cert_chain, private_key, client_ca_path, client_ca)


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None


def _read_certificates(flag: str, path: str) -> bytes:
    data = _read(flag, path)
    if PEM_CERTIFICATE not in data:
        raise TlsConfigError(f"{flag} {path}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----')")
    # OpenSSL parses every certificate in the file here, so a damaged one is refused now, not at the
    # first handshake.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise TlsConfigError(f"{flag} {path}: not a valid PEM certificate: {exc}") from None
    return data


def _no_passphrase() -> str:
    raise TlsConfigError("encrypted")


def _check_key_matches(cert_path: str, key_path: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except TlsConfigError:
        raise TlsConfigError(f"--tls-key {key_path}: the key is encrypted (has a passphrase); give an "
                             "unencrypted PEM key") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsConfigError(f"--tls-key {key_path} is not the private key of the certificate in "
                                 f"--tls-cert {cert_path}") from None
        raise TlsConfigError(f"--tls-key {key_path}: not a private key OpenSSL can read: {exc}") from None
