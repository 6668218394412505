"""Client certificates from a PKI engine (OpenBao's, Vault's): the key pair made in memory and
the request (CSR) it signs, and the issued answer checked and turned into a ``Token`` whose
value is the private key and whose ``certificate`` is the chain to present. Nothing here
touches a disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ...errors import IssuerError
from ...secret import Secret
from ..token import Token

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(key_type: Literal["ec", "rsa"]) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def signing_request(key: PrivateKey, common_name: str) -> str:
    """A PEM CSR for ``key``; the PKI role decides the names and usages it grants."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def colon_hex(serial: int) -> str:
    """A serial number as OpenBao writes it (and its revoke endpoint reads it): 1f:a0:…"""
    digits = format(serial, "x")
    digits = "0" * (len(digits) % 2) + digits
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def _pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def issued_certificate(
    data: dict[str, Any],
    key: PrivateKey | None,
    where: str,
    error: Callable[[str], IssuerError],
) -> Token:
    """The engine's answer (``data`` of pki/sign or pki/issue) as a client-certificate token.
    ``key``: the one the CSR was made with; None when the engine made it (``private_key``).
    The leaf must hold the key's public half and still be valid."""
    leaf_pem = data.get("certificate")
    if not isinstance(leaf_pem, str):
        raise error(f"{where} answered without data.certificate")
    if key is None:
        private = data.get("private_key")
        if not isinstance(private, str):
            raise error(f"{where} answered without data.private_key")
        try:
            loaded = serialization.load_pem_private_key(private.encode(), password=None)
        except ValueError:
            raise error(f"{where} answered a data.private_key that is not a PEM key") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise error(f"{where} answered a key of an unsupported type")
        key = loaded
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    except ValueError:
        raise error(f"{where} answered a data.certificate that is not a PEM certificate") from None
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise error(f"{where} answered a certificate for another key")
    lifetime_s = leaf.not_valid_after_utc.timestamp() - time.time()
    if lifetime_s <= 0:
        raise error(f"{where} answered a certificate that has already expired")
    chain = data.get("ca_chain")
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        issuing = data.get("issuing_ca")
        chain = [issuing] if isinstance(issuing, str) else []
    return Token(
        value=Secret(_pem(key)),
        token_type="x509",
        lifetime_s=lifetime_s,
        certificate="\n".join([leaf_pem.strip(), *(c.strip() for c in chain)]) + "\n",
        serial=colon_hex(leaf.serial_number),
    )
