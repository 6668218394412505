"""What the sidecar holds to prove who the workload is: key files, secret files, in-memory keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..errors import IdentityError
from ..secret import Secret
from .jose import SigningKey, algorithm


def load_signing_key(path: Path, *, what: str) -> SigningKey:
    """Load a PEM private key (EC P-256, Ed25519 or RSA ≥ 2048) for signing client assertions."""
    data = _read(path, what=what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"{what}: {path} is not an unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise IdentityError(
            f"{what}: {path} holds a {type(key).__name__}; use EC P-256, Ed25519 or RSA"
        )
    try:
        algorithm(key)
    except ValueError as exc:
        raise IdentityError(f"{what}: {path}: {exc}") from None
    return key


def read_secret_file(path: Path, *, what: str) -> Secret:
    """Read a secret from a file, stripping one trailing newline; empty files are an error."""
    try:
        value = _read(path, what=what).decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:  # its message quotes a byte of the secret: not for the log
        raise IdentityError(f"{what}: {path} is not UTF-8 text") from None
    if not value:
        raise IdentityError(f"{what}: {path} is empty")
    return Secret(value)


def generate_key(alg: str) -> SigningKey:
    """A fresh key for ``alg`` that lives only in this process's memory (DPoP proofs, JWTs)."""
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"no key generation for alg {alg!r}")


def _read(path: Path, *, what: str) -> bytes:
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what}: {path} does not exist; mount it into the sidecar") from None
    except PermissionError:
        raise IdentityError(
            f"{what}: {path} is not readable by uid {os.getuid()}; fix its owner or mode"
        ) from None
    except OSError as exc:
        raise IdentityError(f"{what}: {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"{what}: {path} is not a regular file")
    return data
