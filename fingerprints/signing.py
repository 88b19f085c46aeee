"""Signatures over a document's content digest: HMAC-SHA256 or Ed25519.

A signed document (fingerprint, audit report, commitment) keeps its `content_sha256` and adds

    "signature": {"scheme": "hmac-sha256" | "ed25519", "key_id": "<16 hex>", "value": "<base64>"}

beside it. What is signed is the domain-separated digest `deepcore:<kind>:v1:<content_sha256>`,
so a fingerprint signature can never pass for a report signature and vice versa, and adding a
signature never changes the digest an owner may already have published as a commitment.

Keys:
* HMAC-SHA256: a shared secret of at least 16 bytes, read from an environment variable whose
  *name* the user gives (never from the command line, never logged). Whoever can verify can sign.
* Ed25519 (`cryptography`): a PEM private key signs; its public key (PEM) verifies. The
  signature records the signer's public key id, but verification always uses the key the user
  trusts, never the one a document names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from deepcore_auditor.adapters.errors import InputError, first_line
from deepcore_auditor.fingerprints.errors import SignatureError

HMAC_SCHEME = "hmac-sha256"
ED25519_SCHEME = "ed25519"
MIN_HMAC_BYTES = 16


def signed_message(kind: str, digest: str) -> bytes:
    return f"deepcore:{kind}:v1:{digest}".encode()


class Key(ABC):
    """A key that verifies, and perhaps signs, signature blocks."""

    scheme: str

    @property
    @abstractmethod
    def key_id(self) -> str: ...

    @property
    def can_sign(self) -> bool:
        return True

    @abstractmethod
    def _sign(self, message: bytes) -> bytes: ...

    @abstractmethod
    def _verify(self, message: bytes, signature: bytes) -> bool: ...

    def sign(self, kind: str, digest: str) -> dict[str, Any]:
        """The signature block for a document of `kind` whose content digest is `digest`."""
        if not self.can_sign:
            raise InputError(f"key {self.key_id} is a public key: it verifies signatures but cannot make them")
        return {"scheme": self.scheme, "key_id": self.key_id, "value": base64.b64encode(self._sign(signed_message(kind, digest))).decode()}

    def verify(self, block: Any, kind: str, digest: str, what: str) -> None:
        """Raise SignatureError unless `block` is this key's valid signature of `digest`."""
        if block is None:
            raise SignatureError(f"{what} is not signed, but a key was given to verify it")
        if not isinstance(block, dict) or not isinstance(block.get("value"), str):
            raise SignatureError(f"{what} has a malformed signature block")
        if block.get("scheme") != self.scheme:
            raise SignatureError(f"{what} is signed with {block.get('scheme')!r}, but the key given is {self.scheme}")
        try:
            raw = base64.b64decode(block["value"], validate=True)
        except ValueError:
            raise SignatureError(f"{what} has a malformed signature value") from None
        if not self._verify(signed_message(kind, digest), raw):
            other = block.get("key_id") != self.key_id
            raise SignatureError(
                f"{what}: signature does not verify"
                + (f" (signed with key {block.get('key_id')}, not {self.key_id})" if other else " (content or signature modified)")
            )


class HmacKey(Key):
    scheme = HMAC_SCHEME

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_HMAC_BYTES:
            raise InputError(f"an HMAC key needs at least {MIN_HMAC_BYTES} bytes, got {len(secret)}")
        self._secret = secret

    @property
    def key_id(self) -> str:
        # A digest of a digest: names the key without revealing anything usable about it.
        return hashlib.sha256(b"deepcore-hmac-key-id:" + hashlib.sha256(self._secret).digest()).hexdigest()[:16]

    def _sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _verify(self, message: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self._sign(message), signature)

    def __repr__(self) -> str:  # never the secret
        return f"HmacKey(key_id={self.key_id})"


class Ed25519Key(Key):
    scheme = ED25519_SCHEME

    def __init__(self, private: Any = None, public: Any = None) -> None:
        self._private = private
        self._public = public if public is not None else private.public_key()

    @property
    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.public_bytes).hexdigest()[:16]

    @property
    def can_sign(self) -> bool:
        return self._private is not None

    def _sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def _verify(self, message: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"Ed25519Key(key_id={self.key_id}, private={self.can_sign})"


def hmac_key_from_env(name: str) -> HmacKey:
    """The HMAC key held by environment variable `name` (its UTF-8 bytes)."""
    value = os.environ.get(name)
    if not value:
        raise InputError(f"environment variable {name} is not set or empty: it must hold the HMAC key")
    return HmacKey(value.encode())


def load_ed25519_key(path: Path) -> Ed25519Key:
    """An Ed25519 key from a PEM file: a private key (signs and verifies) or a public key."""
    from cryptography.exceptions import InternalError, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(path)
    if not path.is_file():
        raise InputError(f"key file not found: {path}")
    data = path.read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None)
            if isinstance(key, ed25519.Ed25519PrivateKey):
                return Ed25519Key(private=key)
        else:
            pub = serialization.load_pem_public_key(data)
            if isinstance(pub, ed25519.Ed25519PublicKey):
                return Ed25519Key(public=pub)
    except (ValueError, TypeError, InternalError) as e:  # InternalError: OpenSSL refusing a key's bytes
        raise InputError(f"{path} is not a readable PEM key (an encrypted key is not supported): {first_line(e)}") from None
    except UnsupportedAlgorithm:  # a well-formed key of an algorithm cryptography does not know
        pass
    raise InputError(f"{path} holds a key of another type: an Ed25519 key is needed")


def resolve_key(key_file: Path | None, hmac_key_env: str | None) -> Key | None:
    """The key a command was given (at most one of the two ways), or None."""
    if key_file is not None and hmac_key_env is not None:
        raise InputError("give one key: --key (Ed25519 PEM) or --hmac-key-env, not both")
    if key_file is not None:
        return load_ed25519_key(key_file)
    if hmac_key_env is not None:
        if not hmac_key_env:
            raise InputError("--hmac-key-env needs the name of an environment variable, got an empty name")
        return hmac_key_from_env(hmac_key_env)
    return None


def generate_ed25519(private_path: Path, public_path: Path) -> Ed25519Key:
    """Write a new key pair: the private PEM readable by its owner only (0600), the public PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    for p in (private_path, public_path):
        if Path(p).exists():
            raise InputError(f"{p} already exists: choose another path (a key is never overwritten)")
        if not Path(p).parent.is_dir():
            raise InputError(f"cannot write {p}: directory {Path(p).parent} does not exist")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    try:
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(public_pem)
    except BaseException:
        Path(private_path).unlink(missing_ok=True)
        raise
    return Ed25519Key(private=key)
