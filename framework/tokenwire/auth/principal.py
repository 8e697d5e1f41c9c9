"""Who is calling: the principal that authentication names and everything after it reads.

principal = Principal(tenant="acme", user="alice", roles=frozenset({"chat"}))
principal.owner   # "acme/alice": the key that owns alice's conversations
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANONYMOUS", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: set by authentication, read by quotas, stores and logs."""

    tenant: str
    user: str
    roles: frozenset[str] = frozenset()
    plan: str = "default"

    @property
    def owner(self) -> str:
        """The key that owns this caller's conversations."""
        return f"{self.tenant}/{self.user}"


ANONYMOUS = Principal(tenant="default", user="anonymous")
"""The caller of a server whose authentication is off (it says so loudly at start)."""
