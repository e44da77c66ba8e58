"""TLS files, one home for loading and checking them: Redis clients (igw/redis_conn.py), the grpc.aio server
of the rate-limit service (igw/service_runtime.py) and the grpclib server of ext_proc (igw/grpclib_server.py)
all report a missing, unreadable or malformed file the same way, naming the setting and the path, at startup
rather than at the first handshake.

ServerContext is the asyncio side of a server certificate: an ssl.SSLContext for HTTP/2 (ALPN h2) that
picks up rotated files without a restart."""

from __future__ import annotations

import argparse
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the setting and the path."""


def _read_file(path: str, label: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TlsFileError(f"{label} {path}: cannot read: {exc.strerror or exc}") from None


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's reason in a few words, without its source-file position."""
    reason = str(getattr(exc, "reason", None) or exc)
    reason = re.sub(r"\s*\(_ssl\.c:\d+\)", "", reason).replace("[SSL] ", "")
    plain = {"PEM_LIB": "not valid PEM", "PEM lib": "not valid PEM", "NO_START_LINE": "no PEM block in it",
             "Empty certificate data": "empty"}
    return plain.get(reason, reason.replace("_", " ").lower())


def load_ca_file(context: ssl.SSLContext, path: str, label: str) -> bytes:
    """Trust the certificates of a PEM file; its bytes are returned for APIs that want them raw (grpc)."""
    data = _read_file(path, label)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFileError(f"{label} {path}: not a PEM CA certificate ({_ssl_reason(exc)})") from None
    return data


def load_key_pair(context: ssl.SSLContext, cert_path: str, key_path: str | None, cert_label: str,
                  key_label: str) -> tuple[bytes, bytes]:
    """Load a certificate chain and its private key (the key may sit in the certificate file when
    key_path is None). Each file is checked on its own first, so the error names the one at fault."""
    cert = _read_file(cert_path, cert_label)
    key = _read_file(key_path, key_label) if key_path else cert
    try:
        ssl.create_default_context().load_verify_locations(cadata=cert.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFileError(f"{cert_label} {cert_path}: not a PEM certificate ({_ssl_reason(exc)})") from None
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        if "mismatch" in reason:
            problem = f"private key does not match the certificate {cert_path}"
        elif key_path:
            problem = f"not a PEM private key ({reason})"
        else:
            problem = f"holds no private key ({reason}): give the key file too"
        raise TlsFileError(f"{key_label if key_path else cert_label} {key_path or cert_path}: {problem}") from None
    except OSError as exc:  # the file changed between the two reads
        raise TlsFileError(f"{cert_label} {cert_path}: cannot read: {exc.strerror or exc}") from None
    return cert, key


def _flag(env: str) -> str:
    return f"{env} (--{env.lower().replace('_', '-')})"


SERVER_TLS_NAMES = (_flag("GRPC_SERVER_TLS_CERT"), _flag("GRPC_SERVER_TLS_KEY"), _flag("GRPC_CLIENT_TLS_CACERT"))


def server_tls_settings_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with upstream's GRPC_SERVER_USE_TLS / _TLS_CERT / _TLS_KEY / GRPC_CLIENT_TLS_CACERT / _SAN
    as given together (both services read them), before any file is opened; None when they fit. Stricter
    than upstream on purpose: TLS files without TLS on would serve in plain text what the operator meant
    to protect."""
    use_tls, cert, key = args.grpc_server_use_tls, args.grpc_server_tls_cert, args.grpc_server_tls_key
    client_ca, client_san = args.grpc_client_tls_cacert, args.grpc_client_tls_san
    given = [_flag(env) for env, value in (("GRPC_SERVER_TLS_CERT", cert), ("GRPC_SERVER_TLS_KEY", key),
                                           ("GRPC_CLIENT_TLS_CACERT", client_ca),
                                           ("GRPC_CLIENT_TLS_SAN", client_san)) if value]
    if not use_tls:
        if given:
            return (f"{given[0]} is set but {_flag('GRPC_SERVER_USE_TLS')} is not true: gRPC would be served "
                    "in plain text")
        return None
    if not cert or not key:
        missing = "GRPC_SERVER_TLS_CERT" if not cert else "GRPC_SERVER_TLS_KEY"
        return (f"GRPC_SERVER_USE_TLS=true needs {_flag('GRPC_SERVER_TLS_CERT')} and {_flag('GRPC_SERVER_TLS_KEY')}; "
                f"{missing} is not set")
    if client_san and not client_ca:
        return (f"{_flag('GRPC_CLIENT_TLS_SAN')} needs {_flag('GRPC_CLIENT_TLS_CACERT')}: only a verified client "
                "certificate has a SAN to check")
    return None


def file_stamp(path: str | None) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or swapped (a Kubernetes secret update renames a directory), or
    when only its permissions or owner are mended (ctime), so a file that could not be read is tried again."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns) if st else None


Stamps = tuple[tuple[int, int, int, int] | None, ...]


class FilesWatch:
    """When a server's TLS files should be read again: when their stamps changed since the last good load, or,
    after a load that failed, once the files change again or RETRY_S has passed (a failure that no file change
    will mend, such as running out of file descriptors, must not leave the old certificate in place until the
    next rotation, while a broken file must not be re-read and logged at every handshake)."""

    RETRY_S = 10.0

    def __init__(self, paths: tuple[str | None, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self.clock = clock
        self.loaded = self.stamps()
        self.failed: Stamps | None = None
        self.retry_at = 0.0

    def stamps(self) -> Stamps:
        return tuple(file_stamp(path) for path in self.paths)

    def due(self) -> Stamps | None:
        """The stamps to load now, or None when nothing is to be done."""
        stamps = self.stamps()
        if stamps == self.loaded:
            return None
        if stamps == self.failed and self.clock() < self.retry_at:
            return None
        return stamps

    def succeeded(self, stamps: Stamps) -> None:
        self.loaded, self.failed = stamps, None

    def failed_with(self, stamps: Stamps) -> bool:
        """Record a failed load; True when it is news (other files than the last failure), to log as an error."""
        news = stamps != self.failed
        self.failed, self.retry_at = stamps, self.clock() + self.RETRY_S
        return news


H2_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.3's suites are all AEAD and not affected


@dataclass(frozen=True)
class ServerFiles:
    """The files of a TLS server: certificate chain and key, and with client_ca_file mutual TLS (every
    client must present a certificate that chains to it). `names` are the settings that hold the three
    paths, for error messages."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    names: tuple[str, str, str] = ("certificate", "key", "client CA")

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def h2_context(self, kind: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
        """A server context for HTTP/2 (gRPC) from the files as they are now; TlsFileError if one cannot
        be used. TLS 1.2 at least (HTTP/2 forbids older) with forward-secret AEAD ciphers only (HTTP/2
        blocklists the rest; grpc's own servers offer the same), ALPN h2 (gRPC clients require it), and no
        session tickets. A TLS 1.2 client may still resume by session ID (Python cannot turn OpenSSL's
        session cache off), which skips the client certificate check: that is only safe because the
        cache belongs to this context, and a reload builds a new one (ServerContext), so no session
        outlives the client CA it was verified against."""
        context = kind(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(H2_TLS12_CIPHERS)
        context.set_alpn_protocols(["h2"])
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
        load_key_pair(context, self.cert_file, self.key_file, self.names[0], self.names[1])
        if self.client_ca_file:
            load_ca_file(context, self.client_ca_file, self.names[2])
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class _PerConnectionContext(ssl.SSLContext):
    """The context an asyncio server is started with; each connection's TLS object is made by the context
    ServerContext holds at that moment instead (asyncio asks for one with wrap_bio per connection)."""

    owner: ServerContext

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        current = self.owner.for_new_connection()
        if current is self:
            return super().wrap_bio(*args, **kwargs)
        return current.wrap_bio(*args, **kwargs)


class ServerContext:
    """The ssl.SSLContext an asyncio server is started with, plus new files without a restart.

    An asyncio server keeps the context it was started with, so `context` stays that first one, but it
    makes each connection's TLS object from the newest context: before every handshake the files are
    stat'ed and, when one changed, a whole new context is built from them. A whole context rather than
    load_cert_chain on the live one: a half-written pair or a bad file never leaves the server without a
    working certificate, a new client CA replaces the old one instead of being added to it, and the TLS
    1.2 sessions cached before the change (each context has its own cache) cannot be resumed after it,
    which would skip the check against the new client CA. (Swapping the context in the SNI callback did
    not do that: OpenSSL looks sessions up in the cache of the context the connection was made with.)
    A bad new file is logged and the context in use kept; a pair written one file after the other is
    retried once the second lands, as that changes its stamp again, and a load that failed is retried
    (FilesWatch)."""

    def __init__(self, files: ServerFiles, log: logging.Logger) -> None:
        self.files = files
        self.log = log
        self.watch = FilesWatch((files.cert_file, files.key_file, files.client_ca_file))
        self.context = files.h2_context(_PerConnectionContext)
        self.context.owner = self  # type: ignore[attr-defined]
        self.current: ssl.SSLContext = self.context

    def reload_if_changed(self) -> None:
        stamps = self.watch.due()
        if stamps is None:
            return
        try:
            self.current = self.files.h2_context()
        except TlsFileError as exc:
            log = self.log.error if self.watch.failed_with(stamps) else self.log.debug
            log("TLS files changed but cannot be used, keeping the current ones: %s (tried again in %.0f s)",
                exc, FilesWatch.RETRY_S)
            return
        self.watch.succeeded(stamps)
        self.log.info("TLS files reloaded: %s", ", ".join(self.files.paths))

    def for_new_connection(self) -> ssl.SSLContext:
        try:
            self.reload_if_changed()
        except Exception:  # an exception here would fail the connection without a word
            self.log.exception("checking the TLS files for changes failed; keeping the current ones")
        return self.current
