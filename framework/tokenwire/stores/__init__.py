"""Conversation stores: where a conversation's history is kept between turns.

:class:`ConversationStore` is the contract; :class:`SQLiteConversationStore`
is the embedded default (one file, no server) and
:class:`~tokenwire.stores.postgres.PostgresConversationStore` the shared one
(PostgreSQL, for several gateways). :func:`open_store_from_config` builds the
one the configuration names. Example::

    from tokenwire.stores import SQLiteConversationStore

    async with SQLiteConversationStore("var/conversations.db") as store:
        conv = await store.create_conversation("alice", title="New chat")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenwire.stores.conversations import (
    MAX_ID_LENGTH,
    MAX_TITLE_BYTES,
    MESSAGE_ROLES,
    BegunTurn,
    Conversation,
    ConversationBusyError,
    ConversationStore,
    Page,
    StoreClosedError,
    StoredMessage,
    TurnEnd,
    TurnRecord,
    conversation_not_found,
    is_valid_id,
    new_id,
    validate_limit,
    validate_message_id,
    validate_role,
)
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.stores.usage import USAGE_GROUPS, UsageRecord, UsageTotal

if TYPE_CHECKING:
    from tokenwire.config import StoreConfig
    from tokenwire.stores.postgres import PostgresConversationStore

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TITLE_BYTES",
    "MESSAGE_ROLES",
    "USAGE_GROUPS",
    "BegunTurn",
    "Conversation",
    "ConversationBusyError",
    "ConversationStore",
    "Page",
    "PostgresConversationStore",
    "SQLiteConversationStore",
    "StoreClosedError",
    "StoredMessage",
    "TurnEnd",
    "TurnRecord",
    "UsageRecord",
    "UsageTotal",
    "conversation_not_found",
    "is_valid_id",
    "new_id",
    "open_store_from_config",
    "validate_limit",
    "validate_message_id",
    "validate_role",
]


def open_store_from_config(config: StoreConfig) -> ConversationStore:
    """The store ``config`` names, built but not opened (call ``open()``).

    ``backend = "sqlite"`` gives a :class:`SQLiteConversationStore` on
    ``config.resolved_sqlite_path()``; ``"postgres"`` a
    :class:`~tokenwire.stores.postgres.PostgresConversationStore` on
    ``postgres_dsn`` / ``postgres_schema`` with ``postgres_pool_size``
    connections. Both get the heartbeat, gateway timeout and idempotency TTL.
    """
    if config.backend == "postgres":
        from tokenwire.stores.postgres import PostgresConversationStore

        return PostgresConversationStore(
            config.postgres_dsn,
            schema=config.postgres_schema,
            pool_size=config.postgres_pool_size,
            heartbeat_s=config.heartbeat_s,
            gateway_timeout_s=config.gateway_timeout_s,
            idempotency_ttl_s=config.idempotency_ttl_s,
        )
    return SQLiteConversationStore(
        config.resolved_sqlite_path(),
        heartbeat_s=config.heartbeat_s,
        gateway_timeout_s=config.gateway_timeout_s,
        idempotency_ttl_s=config.idempotency_ttl_s,
    )


def __getattr__(name: str) -> Any:
    # The PostgreSQL store loads asyncpg, which an embedded server never needs.
    if name == "PostgresConversationStore":
        from tokenwire.stores.postgres import PostgresConversationStore

        return PostgresConversationStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
