"""The tokenizer a worker hands to gateways: a zip of its files, sent in chunks.

``GetTokenizer`` streams a zip archive of the tokenizer's files (``tokenizer.json``,
its config with the chat template...) in chunks, the last carrying the SHA-256 of
the whole archive. A worker builds it once from its engine's tokenizer source (a
GGUF's embedded tokenizer is saved as plain files, so gateways need not read the
model file); a gateway checks the checksum, unpacks the archive into a directory
named by it and loads the tokenizer from there.

A byte tokenizer (fake engines) has no files: its archive holds only
``tokenwire-tokenizer.json`` saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenwire.backend import TokenizerSource
from tokenwire.errors import ConfigError, UnavailableError

__all__ = ["CHUNK_BYTES", "chunks_of", "pack_tokenizer", "unpack_tokenizer"]

CHUNK_BYTES = 1 << 20  # one GetTokenizerChunk's data; gRPC's default limit is 4 MiB
_MARKER = "tokenwire-tokenizer.json"
_MAX_ARCHIVE_BYTES = 256 << 20  # tokenizers are a few MB; a bigger archive is refused
_MAX_FILES = 64


def pack_tokenizer(source: TokenizerSource) -> bytes:
    """The zip archive of ``source``'s tokenizer files. Blocking (reads the model)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if source.kind == "bytes":
            archive.writestr(_MARKER, json.dumps({"kind": "bytes"}))
        elif source.gguf_file or not Path(source.path).is_dir():
            from tokenwire.model.tokenizers import TransformersTokenizer, load_tokenizer

            tokenizer = load_tokenizer(source)  # cached: the worker loads it anyway
            if not isinstance(tokenizer, TransformersTokenizer):
                raise ConfigError(f"cannot pack a {type(tokenizer).__name__} as files")
            with tempfile.TemporaryDirectory() as scratch:
                tokenizer.save(scratch)
                for path in sorted(Path(scratch).iterdir()):
                    archive.write(path, path.name)
        else:
            for path in sorted(Path(source.path).iterdir()):
                if path.is_file() and _is_tokenizer_file(path.name):
                    archive.write(path, path.name)
    return buffer.getvalue()


def chunks_of(archive: bytes) -> Iterator[tuple[bytes, str]]:
    """``(data, sha256)`` pieces of ``archive``; only the last names the checksum."""
    digest = hashlib.sha256(archive).hexdigest()
    pieces = [archive[i : i + CHUNK_BYTES] for i in range(0, len(archive), CHUNK_BYTES)] or [b""]
    for i, piece in enumerate(pieces):
        yield piece, digest if i == len(pieces) - 1 else ""


def unpack_tokenizer(chunks: Iterable[tuple[bytes, str]], cache_dir: str) -> TokenizerSource:
    """Check and unpack an archive received as chunks into ``cache_dir``/<sha256>/;
    the tokenizer source that loads it. Blocking."""
    data = bytearray()
    digest = ""
    for piece, checksum in chunks:
        data += piece
        if len(data) > _MAX_ARCHIVE_BYTES:
            raise UnavailableError(f"the worker's tokenizer is over {_MAX_ARCHIVE_BYTES} bytes")
        digest = checksum or digest
    actual = hashlib.sha256(data).hexdigest()
    if not digest or digest != actual:
        raise UnavailableError("the worker's tokenizer archive failed its SHA-256 check")
    target = Path(cache_dir).expanduser() / actual
    marker = target / _MARKER
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
        try:
            with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
                names = archive.namelist()
                if len(names) > _MAX_FILES or any(not _plain_name(n) for n in names):
                    raise UnavailableError("the worker's tokenizer archive holds unexpected paths")
                archive.extractall(staging)
            os.replace(staging, target)  # atomic: a concurrent unpack of the same sum is fine
        except (zipfile.BadZipFile, OSError) as exc:
            if target.is_dir():  # another gateway process unpacked it first
                pass
            else:
                raise UnavailableError(f"cannot unpack the worker's tokenizer: {exc}") from exc
        finally:
            if staging.exists():
                _remove_tree(staging)
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind", "")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable {marker}: {exc}") from exc
        return TokenizerSource(kind=str(kind))
    return TokenizerSource(path=str(target))


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges"))


def _plain_name(name: str) -> bool:
    return "/" not in name and "\\" not in name and name not in ("", ".", "..")


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
