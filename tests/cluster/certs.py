"""Throwaway PKI for one test control plane: a CA, the API server's serving certificate for
127.0.0.1, client certificates (admin in system:masters, the controller-manager), and the
service-account signing key. EC P-256 keys: generating them takes milliseconds."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
    )


class PKI:
    """Writes every file into `dir` and exposes the paths the components' flags need."""

    def __init__(self, dir: Path, ips: tuple[str, ...] = ("127.0.0.1", "10.0.0.1")):
        """ips: the API server's addresses (where it listens, and its `kubernetes` Service IP)."""
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = _key()
        ca_name = _name("deltafleet-test-ca")
        ca = (
            _builder(ca_name, ca_name, self._ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self._ca = ca
        self.ca_crt = _write_cert(ca, dir / "ca.crt")
        self.ca_key = _write_key(self._ca_key, dir / "ca.key")
        self.serving_crt, self.serving_key = self._issue(
            "apiserver", _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH,
            sans=[
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
                *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips),
            ],
        )
        self.admin_crt, self.admin_key = self._issue(
            "admin", _name("deltafleet-test-admin", "system:masters"),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        # The API server calls the kubelet (logs, port-forward, exec) with this client certificate.
        self.kubelet_client_crt, self.kubelet_client_key = self._issue(
            "kubelet-client", _name("kube-apiserver-kubelet-client", "system:masters"),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        self.controller_manager_crt, self.controller_manager_key = self._issue(
            "controller-manager", _name("system:kube-controller-manager"),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        sa = _key()
        self.sa_key = _write_key(sa, dir / "sa.key")
        self.sa_pub = dir / "sa.pub"  # the API server verifies tokens with the public half
        self.sa_pub.write_bytes(sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def client(self, stem: str, cn: str, org: str | None = None) -> tuple[Path, Path]:
        """A client certificate for user `cn` in group `org` (what the API server authenticates)."""
        return self._issue(stem, _name(cn, org), ExtendedKeyUsageOID.CLIENT_AUTH)

    def server(self, stem: str, cn: str, ips: list[str]) -> tuple[Path, Path]:
        return self._issue(stem, _name(cn), ExtendedKeyUsageOID.SERVER_AUTH,
                           sans=[x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips])

    def _issue(self, stem: str, subject: x509.Name, usage, sans=None) -> tuple[Path, Path]:
        key = _key()
        b = (
            _builder(subject, self._ca.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self._ca_key, hashes.SHA256())
        return _write_cert(cert, self.dir / f"{stem}.crt"), _write_key(key, self.dir / f"{stem}.key")
