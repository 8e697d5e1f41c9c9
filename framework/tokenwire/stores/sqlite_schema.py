"""The schema of :class:`~tokenwire.stores.sqlite.SQLiteConversationStore`, as migrations.

``open()`` applies the migrations a file has not seen yet, each in one
transaction, and records progress in ``PRAGMA user_version`` (see
:mod:`tokenwire.stores.sqlite_database`). Only ever append: a shipped migration
never changes. The PostgreSQL store keeps the same tables (see
:mod:`tokenwire.stores.postgres_schema`).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIGRATIONS"]

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: conversations and their messages.
    (
        """
        CREATE TABLE conversations (
            id          TEXT PRIMARY KEY,
            owner       TEXT NOT NULL,
            title       TEXT NOT NULL,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        )
        """,
        # Serves "my conversations, newest first".
        "CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at DESC)",
        # seq, not created_at, orders messages: clocks tie and step backwards.
        # No CHECK on role, so a later role needs no table rebuild.
        """
        CREATE TABLE messages (
            id               TEXT PRIMARY KEY,
            conversation_id  TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            seq              INTEGER NOT NULL,
            role             TEXT NOT NULL,
            content          TEXT NOT NULL,
            turn_id          TEXT NOT NULL,
            complete         INTEGER NOT NULL CHECK (complete IN (0, 1)),
            created_at       REAL NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq)",
    ),
    # 2: turns (who holds a conversation, idempotency keys), gateways, keyset listing.
    (
        # One row per live store instance (gateway); a running turn is alive while
        # its gateway's row is fresh (see tokenwire.stores.heartbeat).
        "CREATE TABLE gateways (id TEXT PRIMARY KEY, heartbeat_at REAL NOT NULL)",
        """
        CREATE TABLE turns (
            turn_id               TEXT PRIMARY KEY,
            conversation_id       TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            owner                 TEXT NOT NULL,
            idempotency_key       TEXT,
            key_expires_at        REAL,
            user_message_id       TEXT NOT NULL,
            answer_id             TEXT NOT NULL,
            model                 TEXT NOT NULL,
            running               INTEGER NOT NULL CHECK (running IN (0, 1)),
            gateway_id            TEXT NOT NULL,
            created_conversation  INTEGER NOT NULL CHECK (created_conversation IN (0, 1)),
            finish_reason         TEXT NOT NULL DEFAULT '',
            filter_category       TEXT NOT NULL DEFAULT '',
            prompt_tokens         INTEGER NOT NULL DEFAULT 0,
            completion_tokens     INTEGER NOT NULL DEFAULT 0,
            created_at            REAL NOT NULL,
            finished_at           REAL
        )
        """,
        """
        CREATE UNIQUE INDEX turns_owner_key ON turns (owner, idempotency_key)
            WHERE idempotency_key IS NOT NULL
        """,
        # At most one running turn per conversation, and how to find it.
        "CREATE UNIQUE INDEX turns_running ON turns (conversation_id) WHERE running = 1",
        # Deleting a conversation finds its turns through this one.
        "CREATE INDEX turns_conversation ON turns (conversation_id)",
        # Keyset pages of "my conversations, newest first" need the id as tie-break.
        "DROP INDEX conversations_owner_updated",
        """
        CREATE INDEX conversations_owner_updated
            ON conversations (owner, updated_at DESC, id DESC)
        """,
        # A turn with its answer's text (once done) and its user message.
        """
        CREATE VIEW turn_records AS
        SELECT t.turn_id, t.owner, t.conversation_id, t.user_message_id, t.answer_id, t.model,
               COALESCE(t.idempotency_key, '') AS idempotency_key, t.running,
               COALESCE(a.content, '') AS answer, COALESCE(a.complete, 0) AS answer_complete,
               t.finish_reason, t.filter_category, t.prompt_tokens, t.completion_tokens,
               t.created_at, COALESCE(u.seq, 0) AS user_seq,
               COALESCE(u.content, '') AS user_content,
               COALESCE(u.created_at, t.created_at) AS user_created_at,
               COALESCE(u.complete, 1) AS user_complete
        FROM turns AS t
        LEFT JOIN messages AS u ON u.id = t.user_message_id
        LEFT JOIN messages AS a ON a.id = t.answer_id AND a.turn_id = t.turn_id AND t.running = 0
        """,
    ),
    # 3: usage, one row per turn that reached the engine (see tokenwire.stores.usage).
    # No foreign key to turns: usage outlives a deleted conversation.
    (
        """
        CREATE TABLE usage_records (
            turn_id            TEXT PRIMARY KEY,
            tenant             TEXT NOT NULL,
            user_name          TEXT NOT NULL,
            api_key_id         TEXT NOT NULL,
            model              TEXT NOT NULL,
            finish_reason      TEXT NOT NULL,
            prompt_tokens      INTEGER NOT NULL,
            completion_tokens  INTEGER NOT NULL,
            recorded_at        REAL NOT NULL
        )
        """,
        # Serves "usage between two times", optionally of one tenant.
        "CREATE INDEX usage_records_time ON usage_records (recorded_at)",
        "CREATE INDEX usage_records_tenant_time ON usage_records (tenant, recorded_at)",
    ),
    # 4: flagged moderation events (see tokenwire.stores.moderation_events), listed
    # newest first. No foreign key to turns: events outlive a deleted conversation.
    (
        """
        CREATE TABLE moderation_events (
            event_id     TEXT PRIMARY KEY,
            recorded_at  REAL NOT NULL,
            tenant       TEXT NOT NULL,
            user_name    TEXT NOT NULL,
            turn_id      TEXT NOT NULL,
            direction    TEXT NOT NULL,
            category     TEXT NOT NULL,
            moderator    TEXT NOT NULL,
            score        REAL NOT NULL,
            action       TEXT NOT NULL,
            text         TEXT NOT NULL
        )
        """,
        # Serve "every tenant's events" and "one tenant's (or user's) events", newest first.
        "CREATE INDEX moderation_events_time ON moderation_events (recorded_at, event_id)",
        """
        CREATE INDEX moderation_events_account
            ON moderation_events (tenant, user_name, recorded_at, event_id)
        """,
    ),
)
"""Schema migrations in order; migration ``n`` (1-based) brings a file to
``user_version = n``. Only ever append: a shipped migration never changes."""
