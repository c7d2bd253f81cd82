"""Where etcd is and which TLS files reach it: flanneld's ``--etcd-endpoints`` and
``--etcd-cafile/-certfile/-keyfile``, parsed and checked without the etcd client's HTTP/2
stack, which a daemon on the embedded file registry never loads (``control.etcd_registry``
does)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from control.kv import RegistryConfigError


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.bracketed_host}:{self.port}"

    @property
    def bracketed_host(self) -> str:
        """The host as gRPC targets and URLs want it before ``:port``: an IPv6 address in
        brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_endpoints(text: str) -> list[Endpoint]:
    """flanneld's --etcd-endpoints: comma-separated URLs (http:// or https://)."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"etcd endpoint {item!r}: expected http(s)://host:port")
        try:
            port = url.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {item!r}: bad port") from None
        endpoints.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


@dataclass(frozen=True)
class TlsFiles:
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate) as bytes; RegistryConfigError (naming the file) when a
        file is missing, unreadable or not what it should be, or the key does not match
        the certificate: checked here, before any connection, with the ssl module."""

        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise RegistryConfigError(f"cannot read etcd {what} {path}: {e.strerror}") from None

        if (self.certfile is None) != (self.keyfile is None):
            given = "--etcd-certfile" if self.certfile else "--etcd-keyfile"
            raise RegistryConfigError(
                f"--etcd-certfile and --etcd-keyfile go together ({given} was given alone)"
            )
        ca = read(self.cafile, "CA file")
        key = read(self.keyfile, "key file")
        cert = read(self.certfile, "certificate file")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca is not None:
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as e:
                raise RegistryConfigError(
                    f"etcd CA file {self.cafile} holds no usable certificate ({_ssl_reason(e)})"
                ) from None
        if self.certfile is not None and self.keyfile is not None:
            self._check_pair(context)
        return ca, key, cert

    def _check_pair(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(str(self.certfile), str(self.keyfile), password=lambda: b"")
        except ssl.SSLError as e:
            reason = _ssl_reason(e)
            if "KEY_VALUES_MISMATCH" in reason or "key values mismatch" in reason:
                raise RegistryConfigError(
                    f"etcd key file {self.keyfile} does not match the certificate in "
                    f"{self.certfile}"
                ) from None
            raise RegistryConfigError(
                f"etcd certificate {self.certfile} or key {self.keyfile} is unusable ({reason})"
            ) from None
        except OSError as e:
            raise RegistryConfigError(
                f"cannot read etcd certificate or key: {e.strerror}"
            ) from None


def _ssl_reason(error: Exception) -> str:
    return (getattr(error, "reason", None) or str(error) or type(error).__name__).splitlines()[0]
