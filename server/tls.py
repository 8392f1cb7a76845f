"""The gRPC port: TLS from PEM files when the settings name them, plaintext otherwise."""

import logging
import os
from pathlib import Path

import grpc
from grpc import aio

from server.config import ServerSettings

log = logging.getLogger(__name__)


def add_grpc_port(grpc_server: aio.Server, settings: ServerSettings) -> int:
    """Bind settings.host:settings.port, with TLS when tls_cert_file and tls_key_file are set; the port bound."""
    address = f"{settings.host}:{settings.port}"
    files = CertificateFiles.of(settings)
    if files is None:
        return grpc_server.add_insecure_port(address)
    return grpc_server.add_secure_port(address, files.credentials())


class CertificateFiles:
    """The server's certificate, key and optional client CA, read again when any of them changes.

    gRPC asks before every new connection's handshake, so a renewed certificate (cert-manager rewrites
    the mounted Secret) is served without a restart; connections already open keep theirs.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._paths = [path for path in (cert_file, key_file, client_ca_file) if path is not None]
        self._cert_file, self._key_file, self._client_ca_file = cert_file, key_file, client_ca_file
        self._stamp = self._stamps()

    @classmethod
    def of(cls, settings: ServerSettings) -> "CertificateFiles | None":
        """None for plaintext; ValueError, naming the settings, for a key without a certificate or the reverse."""
        cert, key, client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError("server.tls_client_ca_file needs server.tls_cert_file and server.tls_key_file")
            return None
        if cert is None or key is None:
            raise ValueError("server.tls_cert_file and server.tls_key_file go together: set both or neither")
        return cls(cert, key, client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._changed_configuration,
            require_client_authentication=self._client_ca_file is not None,
        )

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._key_file.read_bytes(), self._cert_file.read_bytes())],
            root_certificates=self._client_ca_file.read_bytes() if self._client_ca_file else None,
        )

    def _changed_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """None keeps the current certificate: unchanged files, or files caught mid-rewrite."""
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except OSError as error:
            log.warning("TLS files unreadable, keeping the current certificate: %s", error)
            return None
        self._stamp = stamp
        log.info(
            "TLS certificate files changed: serving new connections with them",
            extra={"cert_file": str(self._cert_file)},
        )
        return configuration

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        # stat follows the symlinks a Kubernetes Secret volume swaps on update.
        return tuple((status.st_ino, status.st_mtime_ns) for status in map(os.stat, self._paths))
