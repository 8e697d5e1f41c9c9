"""The first start's admin key, so a server with no configuration is secure and usable.

When the key store has never held a key (and ``auth.bootstrap_admin_key`` is on),
the server creates one key for ``default/admin`` with the admin role, writes it
to ``auth.admin_key_file`` (mode 0600) and prints it once. The store keeps only
its hash. Later starts find a key in the store and do nothing, even if every key
has since been revoked or the file deleted::

    issued = await bootstrap_admin_key(store, config.auth, config.store.data_dir)
    if issued is not None:
        print(admin_key_notice(issued, config.auth.resolved_admin_key_file(data_dir)))
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenwire.auth.config import AuthConfig
from tokenwire.auth.keys import IssuedKey, KeyStore, looks_like_api_key
from tokenwire.auth.principal import Principal
from tokenwire.private_files import make_private_dirs, write_private_file

__all__ = [
    "BOOTSTRAP_DESCRIPTION",
    "admin_key_notice",
    "bootstrap_admin_key",
    "read_key_file",
    "write_key_file",
]

BOOTSTRAP_DESCRIPTION = "admin key created on first start"


async def bootstrap_admin_key(
    store: KeyStore, config: AuthConfig, data_dir: str
) -> IssuedKey | None:
    """Create the first admin key if the store has never held one; else None.

    The key file is written before the key is committed, so a key exists only
    if its file does; racing gateway processes create one key between them.
    """
    if not (config.enabled and config.api_keys and config.bootstrap_admin_key):
        return None
    path = config.resolved_admin_key_file(data_dir)
    admin = Principal(tenant="default", user="admin", roles=frozenset({config.admin_role}))
    return await store.bootstrap_key(
        admin,
        description=BOOTSTRAP_DESCRIPTION,
        persist=lambda issued: write_key_file(path, issued.secret),
    )


def write_key_file(path: str | os.PathLike[str], secret: str) -> None:
    """Write ``secret`` to ``path`` with mode 0600, atomically (a temp file, then rename).

    Missing parent directories are created with mode 0700.
    """
    make_private_dirs(Path(path).parent)
    write_private_file(path, (secret + "\n").encode())


def read_key_file(path: str | os.PathLike[str]) -> str | None:
    """The API key in ``path`` (as the server wrote it), or None if absent or unreadable."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if looks_like_api_key(text) else None


def admin_key_notice(issued: IssuedKey, path: str | os.PathLike[str]) -> str:
    """What the server prints once, on the start that created the admin key."""
    return (
        f"Created an admin API key (id {issued.key.id}); it is shown only this once:\n\n"
        f"    {issued.secret}\n\n"
        f"It is also saved, readable only by you, in {os.fspath(path)}.\n"
        f"Clients send it as 'authorization: Bearer <key>'; tokenwire chat reads it from "
        f"TOKENWIRE_API_KEY or from that file. Create more with 'tokenwire keys create'."
    )
