"""SVIDs as the Workload API hands them over, parsed once: an X.509-SVID (chain, key, the trust
domain's bundle) and a JWT-SVID (the token and the claims credproxy needs). Keys and tokens are
``Secret``; what audit events and logs name an SVID by (ID, serial, certificate fingerprint,
expiry) is public."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import IssuerError
from ..secret import Secret


def split_der(blob: bytes) -> list[bytes]:
    """Concatenated ASN.1 DER certificates (the Workload API's chains and bundles) one by one."""
    items: list[bytes] = []
    at = 0
    while at < len(blob):
        if blob[at] != 0x30 or at + 2 > len(blob):
            raise ValueError("not a DER SEQUENCE")
        length = blob[at + 1]
        header = 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or at + 2 + count > len(blob):
                raise ValueError("bad DER length")
            length = int.from_bytes(blob[at + 2 : at + 2 + count], "big")
            header += count
        end = at + header + length
        if end > len(blob):
            raise ValueError("truncated DER")
        items.append(blob[at:end])
        at = end
    return items


def uri_sans(certificate: x509.Certificate) -> list[str]:
    """The certificate's URI subject alternative names (a SPIFFE ID is the one ``spiffe://``)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.UniformResourceIdentifier))


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, 16 hex digits: public, names a certificate in the trail."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def trust_domain(spiffe_id: str) -> str:
    """``spiffe://example.org/ns/x`` → ``example.org``."""
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def jwks_key_ids(jwks: bytes) -> list[str]:
    """The key IDs of a JWT bundle (a JWKS, as the Workload API carries it); ``ValueError`` when
    it is not one. Key IDs are public: they name the trust domain's JWT authorities."""
    try:
        keys = json.loads(jwks)["keys"]
        return sorted(str(key["kid"]) for key in keys)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a JWKS: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True)
class X509SVID:
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]  # the leaf first
    key: Secret  # PKCS#8 PEM: never logged, never written to a file
    bundle: tuple[x509.Certificate, ...]  # the trust domain's X.509 authorities
    chain_pem: str = field(init=False)
    bundle_pem: str = field(init=False)

    def __post_init__(self) -> None:
        pem = serialization.Encoding.PEM
        object.__setattr__(
            self, "chain_pem", "".join(c.public_bytes(pem).decode() for c in self.chain)
        )
        object.__setattr__(
            self, "bundle_pem", "".join(c.public_bytes(pem).decode() for c in self.bundle)
        )

    @classmethod
    def parse(cls, spiffe_id: str, chain_der: bytes, key_der: bytes, bundle_der: bytes) -> X509SVID:
        """From the Workload API's message; ``ValueError`` when it is not usable."""
        chain = tuple(x509.load_der_x509_certificate(d) for d in split_der(chain_der))
        bundle = tuple(x509.load_der_x509_certificate(d) for d in split_der(bundle_der))
        if not chain or not bundle:
            raise ValueError("an X.509-SVID needs a certificate and a bundle")
        if spiffe_id not in uri_sans(chain[0]):
            raise ValueError(f"the certificate does not name {spiffe_id} as its URI SAN")
        key = serialization.load_der_private_key(key_der, password=None)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(spiffe_id, chain, Secret(pem.decode()), bundle)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def expires_at(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.leaf)

    def valid(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires_at

    def describe(self) -> dict[str, object]:
        """What the trail says of it: never the key."""
        return {
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "cert_fingerprint": self.fingerprint,
            "not_after": self.leaf.not_valid_after_utc.isoformat(),
            "expires_at": round(self.expires_at, 3),
        }


@dataclass(frozen=True, slots=True)
class JWTSVID:
    spiffe_id: str
    token: Secret
    audience: tuple[str, ...]
    expires_at: float
    issued_at: float

    @classmethod
    def parse(cls, spiffe_id: str, token: str, where: str) -> JWTSVID:
        """The claims of a JWT-SVID the local agent signed (trusted as it came over the
        attested socket: read, not verified); ``IssuerError`` when unreadable."""
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            expires = float(claims["exp"])
            audience = claims.get("aud", [])
        except (IndexError, ValueError, KeyError, TypeError):
            raise IssuerError(
                f"{where}: the Workload API answered an unreadable JWT-SVID"
            ) from None
        if isinstance(audience, str):
            audience = [audience]
        issued = float(claims.get("iat", time.time()))
        return cls(spiffe_id, Secret(token), tuple(map(str, audience)), expires, issued)

    @property
    def lifetime_s(self) -> float:
        return self.expires_at - time.time()

    def describe(self) -> dict[str, object]:
        return {
            "spiffe_id": self.spiffe_id,
            "audience": list(self.audience),
            "fingerprint": self.token.fingerprint,
            "expires_at": round(self.expires_at, 3),
            "expires": datetime.datetime.fromtimestamp(self.expires_at, datetime.UTC).isoformat(),
        }
