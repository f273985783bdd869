"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed notes, Ed25519.

Responsible for:
- the checkpoint body (https://c2sp.org/tlog-checkpoint): origin line, decimal tree size
  line, base64 root hash line, each ending in a newline;
- the signed note around it (https://c2sp.org/signed-note): body, blank line, one line
  `— <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>` per signature, the key id
  being the first 4 bytes of SHA-256(key name || 0x0A || 0x01 || public key);
- keys in the text forms of Go's golang.org/x/mod/sumdb/note (`PRIVATE+KEY+<name>+<id>+<b64>`
  and the verifier key `<name>+<id>+<b64>`), or PKCS#8 / SubjectPublicKeyInfo PEM with the
  name given apart, so an auditor can check our notes with the Go tools and we theirs.

Why this format: it is what transparency logs and witnesses already exchange, it is plain
text an auditor can read, and it signs exactly the bytes shown. The only file I/O in
`domain` is `save_key_pair` / `load_*_file`, kept here so that key files are always created
with mode 0600 and never overwritten.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
SIG_TYPE_ED25519 = 0x01
SIGNATURE_PREFIX = "— "  # U+2014 EM DASH, then a space
MAX_SIGNATURES = 100  # as Go's note.Open
_PRIVATE_PREFIX = "PRIVATE+KEY+"


class NoteError(ValueError):
    """A note, checkpoint or key that is malformed or does not verify."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict standard base64: no whitespace, no other alphabet, canonical padding."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise NoteError(f"bad base64: {text[:40]!r}") from exc
    if _b64(raw) != text:
        raise NoteError(f"non-canonical base64: {text[:40]!r}")
    return raw


def _check_name(name: str) -> None:
    """Signed-note key names: non-empty, no Unicode space, no '+' (the key text separator)."""
    if not name or "+" in name or any(ch.isspace() or unicodedata.category(ch) == "Zs" for ch in name):
        raise NoteError(f"bad key name {name!r}: must be non-empty, without spaces or '+'")


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key id of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([SIG_TYPE_ED25519]) + public_key).digest()[:4]


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """A named Ed25519 public key, as an auditor holds it."""

    name: str
    public_key: bytes  # 32 raw bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.public_key) != 32:
            raise NoteError("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    def to_vkey(self) -> str:
        """Go note verifier key text: `<name>+<hex id>+<base64(0x01 || key)>`."""
        return f"{self.name}+{self.key_id_hex}+{_b64(bytes([SIG_TYPE_ED25519]) + self.public_key)}"

    def to_pem(self) -> str:
        """SubjectPublicKeyInfo PEM (the name travels apart)."""
        key = Ed25519PublicKey.from_public_bytes(self.public_key)
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return pem.decode("ascii")

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A named Ed25519 private key (the log's); `verifier` is what to publish."""

    name: str
    seed: bytes = field(repr=False)  # 32 raw bytes (RFC 8032 private key); kept out of logs

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.seed) != 32:
            raise NoteError("an Ed25519 private key is 32 bytes")

    @property
    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def verifier(self) -> VerifierKey:
        pub = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return VerifierKey(self.name, pub)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (deterministic: the same message always gets the same bytes)."""
        return self._private.sign(message)

    def to_skey(self) -> str:
        """Go note signer key text: `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`."""
        return f"{_PRIVATE_PREFIX}{self.name}+{self.verifier.key_id_hex}+{_b64(bytes([SIG_TYPE_ED25519]) + self.seed)}"

    def to_pem(self) -> str:
        """Unencrypted PKCS#8 PEM (the name travels apart)."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return pem.decode("ascii")


def generate_key(name: str) -> SigningKey:
    """A fresh Ed25519 signing key named `name` (e.g. `ledgerflow.example/audit`)."""
    raw = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return SigningKey(name, raw)


def _split_key_text(text: str, parts: int) -> list[str]:
    fields = text.split("+", parts - 1)  # the base64 part may itself contain '+'
    if len(fields) != parts:
        raise NoteError("malformed key text")
    return fields


def parse_signing_key(text: str, name: str | None = None) -> SigningKey:
    """A signing key from Go note text, or from PKCS#8 PEM plus `name`."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        if name is None:
            raise NoteError("a PEM key carries no name: pass name=")
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError) as exc:
            raise NoteError(f"bad PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise NoteError("not an Ed25519 private key")
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return SigningKey(name, raw)
    if not text.startswith(_PRIVATE_PREFIX):
        raise NoteError("not a signer key: expected PRIVATE+KEY+<name>+<id>+<key> or PEM")
    key_name, id_hex, b64 = _split_key_text(text[len(_PRIVATE_PREFIX) :], 3)
    raw = _unb64(b64)
    if len(raw) != 33 or raw[0] != SIG_TYPE_ED25519:
        raise NoteError("signer key is not an Ed25519 key")
    signing = SigningKey(key_name, raw[1:])
    if name is not None and name != key_name:
        raise NoteError(f"key is named {key_name!r}, expected {name!r}")
    if signing.verifier.key_id_hex != id_hex:
        raise NoteError("signer key id does not match its key")
    return signing


def parse_verifier_key(text: str, name: str | None = None) -> VerifierKey:
    """A verifier key from Go note text `<name>+<id>+<b64>`, or from SPKI PEM plus `name`."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        if name is None:
            raise NoteError("a PEM key carries no name: pass name=")
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise NoteError(f"bad PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise NoteError("not an Ed25519 public key")
        return VerifierKey(name, key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    key_name, id_hex, b64 = _split_key_text(text, 3)
    raw = _unb64(b64)
    if len(raw) != 33 or raw[0] != SIG_TYPE_ED25519:
        raise NoteError("verifier key is not an Ed25519 key")
    verifier = VerifierKey(key_name, raw[1:])
    if name is not None and name != key_name:
        raise NoteError(f"key is named {key_name!r}, expected {name!r}")
    if verifier.key_id_hex != id_hex:
        raise NoteError("verifier key id does not match its key")
    return verifier


def save_key_pair(key: SigningKey, path: Path | str) -> tuple[Path, Path]:
    """Write `path` (signer key, mode 0600) and `path`.pub (verifier key); never overwrite.

    Both in Go note text, which carries the name, so loading needs nothing else.
    """
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    if public.exists():
        raise FileExistsError(public)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key.to_skey() + "\n")
    public.write_text(key.verifier.to_vkey() + "\n", encoding="utf-8")
    return private, public


def load_signing_key_file(path: Path | str, name: str | None = None) -> SigningKey:
    """A signing key from a file in Go note text or PKCS#8 PEM (then `name` is required)."""
    return parse_signing_key(Path(path).read_text(encoding="utf-8"), name)


def load_verifier_key_file(path: Path | str, name: str | None = None) -> VerifierKey:
    """A verifier key from a file in Go note text or SPKI PEM (then `name` is required)."""
    return parse_verifier_key(Path(path).read_text(encoding="utf-8"), name)


# --- signed notes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: bytes  # 4 bytes
    signature: bytes


def _check_text(text: str) -> None:
    if not text.endswith("\n") or "\n\n" in text or text.startswith("\n"):
        raise NoteError("note text must be non-empty lines, each ending in a newline")
    if any(ord(ch) < 0x20 and ch != "\n" for ch in text):
        raise NoteError("note text must not contain control characters")


def sign_note(text: str, key: SigningKey) -> str:
    """The signed note: text, blank line, one signature line by `key`."""
    _check_text(text)
    signature = key.sign(text.encode("utf-8"))
    blob = key.verifier.key_id + signature
    return f"{text}\n{SIGNATURE_PREFIX}{key.name} {_b64(blob)}\n"


def split_note(note: str) -> tuple[str, list[NoteSignature]]:
    """Text and parsed signature lines of a note; raises NoteError if malformed (nothing verified)."""
    if not isinstance(note, str):
        raise NoteError("a note is text")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("no blank line between text and signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    _check_text(text)
    if not block.endswith("\n"):
        raise NoteError("signature block must end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError("too many signatures")
    sigs = []
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"malformed signature line {line[:40]!r}")
        fields = line[len(SIGNATURE_PREFIX) :].split(" ")
        if len(fields) != 2:
            raise NoteError(f"malformed signature line {line[:40]!r}")
        name, b64 = fields
        _check_name(name)
        blob = _unb64(b64)
        if len(blob) < 5:
            raise NoteError("signature too short")
        sigs.append(NoteSignature(name, blob[:4], blob[4:]))
    return text, sigs


def open_note(note: str, key: VerifierKey) -> tuple[str, NoteSignature]:
    """The note's text and `key`'s signature, if that signature verifies; NoteError otherwise.

    As Go's note.Open, the first line by this key (name and id) decides; lines by other keys
    are ignored, so witnesses may add cosignatures.
    """
    text, sigs = split_note(note)
    for sig in sigs:
        if sig.name == key.name and sig.key_id == key.key_id:
            if len(sig.signature) == 64 and key.verify(text.encode("utf-8"), sig.signature):
                return text, sig
            raise NoteError(f"signature by {key.name} ({key.key_id_hex}) does not verify")
    raise NoteError(f"no signature by {key.name} ({key.key_id_hex})")


# --- checkpoints ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed checkpoint body: a log's origin, tree size and root hash."""

    origin: str
    tree_size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The tlog-checkpoint text: origin, size, base64 root, then any extension lines."""
        lines = (self.origin, str(self.tree_size), _b64(self.root_hash), *self.extensions)
        return "".join(f"{line}\n" for line in lines)


def checkpoint_body(origin: str, tree_size: int, root_hash: bytes) -> str:
    """Checkpoint text for (origin, size, root); validates what it writes."""
    if not origin or "\n" in origin:
        raise NoteError("origin must be one non-empty line")
    if tree_size < 0 or len(root_hash) != 32:
        raise NoteError("tree size must be >= 0 and the root 32 bytes")
    text = Checkpoint(origin, tree_size, root_hash).body()
    _check_text(text)
    return text


def parse_checkpoint(text: str) -> Checkpoint:
    """A checkpoint body parsed strictly: decimal size without leading zeros, canonical base64 root."""
    _check_text(text)
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("a checkpoint has origin, size and root lines")
    origin, size_text, root_text, *extensions = lines
    if not size_text.isascii() or not size_text.isdigit() or str(int(size_text)) != size_text:
        raise NoteError(f"bad tree size {size_text[:30]!r}")
    root = _unb64(root_text)
    if len(root) != 32:
        raise NoteError("root hash must be 32 bytes")
    return Checkpoint(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(origin: str, tree_size: int, root_hash: bytes, key: SigningKey) -> str:
    """The signed checkpoint note for (origin, size, root)."""
    return sign_note(checkpoint_body(origin, tree_size, root_hash), key)


def open_checkpoint(note: str, key: VerifierKey) -> tuple[Checkpoint, NoteSignature]:
    """The checkpoint in a signed note, if `key` signed it; NoteError otherwise."""
    text, sig = open_note(note, key)
    return parse_checkpoint(text), sig
