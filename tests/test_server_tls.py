"""The gRPC port over TLS: a server given certificate files answers only TLS clients that trust them,
asks for client certificates when given a client CA, and serves a renewed certificate without a restart."""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from server.app import FlywheelServer
from server.config import ServerSettings

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

CALL_TIMEOUT_S = 10  # only to fail instead of hanging


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes


class Authority:
    """A throwaway CA that signs server and client certificates, as cert-manager would."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._sign(self._name, self._key.public_key(), [x509.BasicConstraints(ca=True, path_length=None)])
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, usage: x509.ObjectIdentifier, addresses: tuple[str, ...] = ()) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [x509.BasicConstraints(ca=False, path_length=None), x509.ExtendedKeyUsage([usage])]
        if addresses:
            extensions.append(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
                )
            )
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = self._sign(subject, key.public_key(), extensions)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def _sign(self, subject: x509.Name, public_key, extensions: list) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
        return builder.sign(self._key, hashes.SHA256())


def write_server_files(directory: Path, authority: Authority) -> tuple[Path, Path]:
    issued = authority.issue("flywheel-server", ExtendedKeyUsageOID.SERVER_AUTH, ("127.0.0.1",))
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(issued.cert_pem)
    key_file.write_bytes(issued.key_pem)
    return cert_file, key_file


def get_policy(address: str, credentials: grpc.ChannelCredentials | None) -> pb.PolicyInfo:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return serving_pb2_grpc.FlywheelStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=CALL_TIMEOUT_S)


@pytest.fixture
def start_server(engine_loop, engine):
    started: list[FlywheelServer] = []

    def start(**tls_files: Path) -> FlywheelServer:
        settings = ServerSettings(port=0, metrics_port=0, feedback_token_secret="tls-test-secret", **tls_files)
        server = engine_loop.run(FlywheelServer.start(settings, engine))
        started.append(server)
        return server

    yield start
    for server in started:
        engine_loop.run(server.stop(0))


def test_a_server_with_certificate_files_answers_over_tls_only(tmp_path, start_server):
    authority = Authority("flywheel-test-ca")
    cert_file, key_file = write_server_files(tmp_path, authority)
    server = start_server(tls_cert_file=cert_file, tls_key_file=key_file)

    policy = get_policy(server.address, grpc.ssl_channel_credentials(root_certificates=authority.cert_pem))
    assert policy.digest

    with pytest.raises(grpc.RpcError) as plaintext:
        get_policy(server.address, None)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as untrusted:
        get_policy(server.address, grpc.ssl_channel_credentials(root_certificates=Authority("other-ca").cert_pem))
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_ca_makes_clients_present_a_certificate_it_signed(tmp_path, start_server):
    authority = Authority("flywheel-test-ca")
    cert_file, key_file = write_server_files(tmp_path, authority)
    client_ca_file = tmp_path / "ca.crt"
    client_ca_file.write_bytes(authority.cert_pem)
    server = start_server(tls_cert_file=cert_file, tls_key_file=key_file, tls_client_ca_file=client_ca_file)

    client = authority.issue("a-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    with_cert = grpc.ssl_channel_credentials(authority.cert_pem, client.key_pem, client.cert_pem)
    assert get_policy(server.address, with_cert).digest

    with pytest.raises(grpc.RpcError) as anonymous:
        get_policy(server.address, grpc.ssl_channel_credentials(root_certificates=authority.cert_pem))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = Authority("other-ca").issue("a-stranger", ExtendedKeyUsageOID.CLIENT_AUTH)
    with pytest.raises(grpc.RpcError):
        get_policy(
            server.address, grpc.ssl_channel_credentials(authority.cert_pem, stranger.key_pem, stranger.cert_pem)
        )


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(tmp_path, start_server):
    first = Authority("first-ca")
    cert_file, key_file = write_server_files(tmp_path, first)
    server = start_server(tls_cert_file=cert_file, tls_key_file=key_file)
    assert get_policy(server.address, grpc.ssl_channel_credentials(first.cert_pem)).digest

    second = Authority("second-ca")
    write_server_files(tmp_path, second)
    assert get_policy(server.address, grpc.ssl_channel_credentials(second.cert_pem)).digest
    with pytest.raises(grpc.RpcError):
        get_policy(server.address, grpc.ssl_channel_credentials(first.cert_pem))
