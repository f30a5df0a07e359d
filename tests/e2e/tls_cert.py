"""A self-signed certificate for 127.0.0.1 and localhost, made in the test: with the `cryptography`
package when installed, else with the `openssl` command; the test is skipped when neither is here.
The certificate is its own CA (a client that trusts it verifies the server; a server that trusts
it accepts it as a client certificate)."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class SelfSigned:
    cert: Path
    key: Path

    def client_context(self, with_client_cert: bool = True) -> ssl.SSLContext:
        """Trusts the certificate; presents it as the client's too (unless `with_client_cert` is False)."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        if with_client_cert:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def _with_cryptography(cert: Path, key: Path) -> bool:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return False
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return True


def _with_openssl(cert: Path, key: Path) -> bool:
    openssl = shutil.which("openssl")
    if openssl is None:
        return False
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return True


def self_signed(directory: Path) -> SelfSigned:
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not (_with_cryptography(cert, key) or _with_openssl(cert, key)):
        pytest.skip("neither the cryptography package nor the openssl command is here to make a certificate")
    return SelfSigned(cert, key)
