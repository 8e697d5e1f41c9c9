"""The schema of :class:`~tokenwire.stores.postgres.PostgresConversationStore`, and its migrations.

The tables mirror the SQLite store's (times are ``double precision`` unix
seconds from the gateway's clock, never the server's), plus
``conversations.last_seq``, the seq of its newest message: bumping it in the
UPDATE that locks the conversation hands out the next seq safely under READ
COMMITTED, where a ``MAX(seq) + 1`` read would race. The turn changes are
PL/pgSQL functions, so each is one round trip and takes its locks in one fixed
order, the conversation's row before any turn's row, which keeps them free of
deadlocks.

``open()`` applies :data:`MIGRATIONS` with :func:`migrate`: in one transaction
holding an advisory lock, so gateways that start together migrate once; progress
is kept in ``schema_migrations``. Only ever append a migration.
"""

from __future__ import annotations

import re
from typing import Any, Final

from tokenwire.errors import ConfigError

__all__ = ["BUSY", "MIGRATIONS", "NOT_FOUND", "check_schema_name", "migrate"]

NOT_FOUND: Final = "TW404"
"""SQLSTATE ``begin_turn`` raises for a missing or foreign conversation."""

BUSY: Final = "TW409"
"""SQLSTATE ``begin_turn`` raises while a live turn holds the conversation (DETAIL: its id)."""

_MIGRATION_LOCK: Final = 0x74_77  # with hashtext(schema): pg_advisory_xact_lock's two keys
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# A turn row (the `turns` table in scope) whose gateway is dead at the time
# given by the enclosing function's p_now / p_dead_before.
_DEAD = """
    turns.gateway_id <> p_gateway_id AND NOT EXISTS (
        SELECT 1 FROM gateways AS g
        WHERE g.id = turns.gateway_id AND g.heartbeat_at >= p_dead_before)
"""

_TABLES: Final = (
    """
    CREATE TABLE conversations (
        id          text PRIMARY KEY,
        owner       text NOT NULL,
        title       text NOT NULL,
        created_at  double precision NOT NULL,
        updated_at  double precision NOT NULL,
        last_seq    integer NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at DESC, id DESC)",
    """
    CREATE TABLE messages (
        id               text PRIMARY KEY,
        conversation_id  text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq              integer NOT NULL,
        role             text NOT NULL,
        content          text NOT NULL,
        turn_id          text NOT NULL,
        complete         boolean NOT NULL,
        created_at       double precision NOT NULL,
        CONSTRAINT messages_conversation_seq UNIQUE (conversation_id, seq)
    )
    """,
    "CREATE TABLE gateways (id text PRIMARY KEY, heartbeat_at double precision NOT NULL)",
    """
    CREATE TABLE turns (
        turn_id               text PRIMARY KEY,
        conversation_id       text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        owner                 text NOT NULL,
        idempotency_key       text,
        key_expires_at        double precision,
        user_message_id       text NOT NULL,
        answer_id             text NOT NULL,
        model                 text NOT NULL,
        running               boolean NOT NULL,
        gateway_id            text NOT NULL,
        created_conversation  boolean NOT NULL,
        finish_reason         text NOT NULL DEFAULT '',
        filter_category       text NOT NULL DEFAULT '',
        prompt_tokens         integer NOT NULL DEFAULT 0,
        completion_tokens     integer NOT NULL DEFAULT 0,
        created_at            double precision NOT NULL,
        finished_at           double precision
    )
    """,
    """
    CREATE UNIQUE INDEX turns_owner_key ON turns (owner, idempotency_key)
        WHERE idempotency_key IS NOT NULL
    """,
    "CREATE UNIQUE INDEX turns_running ON turns (conversation_id) WHERE running",
    "CREATE INDEX turns_conversation ON turns (conversation_id)",
    """
    CREATE VIEW turn_records AS
    SELECT t.turn_id, t.owner, t.conversation_id, t.user_message_id, t.answer_id, t.model,
           COALESCE(t.idempotency_key, '') AS idempotency_key, t.running,
           COALESCE(a.content, '') AS answer, COALESCE(a.complete, false) AS answer_complete,
           t.finish_reason, t.filter_category, t.prompt_tokens, t.completion_tokens,
           t.created_at, COALESCE(u.seq, 0) AS user_seq,
           COALESCE(u.content, '') AS user_content,
           COALESCE(u.created_at, t.created_at) AS user_created_at,
           COALESCE(u.complete, true) AS user_complete
    FROM turns AS t
    LEFT JOIN messages AS u ON u.id = t.user_message_id
    LEFT JOIN messages AS a ON a.id = t.answer_id AND a.turn_id = t.turn_id AND NOT t.running
    """,
)

_FUNCTIONS: Final = (
    # True when the turn is not running (any more): it was, on a dead gateway, and
    # is ended here with reason 'error' and no answer; or something ended it before.
    f"""
    CREATE FUNCTION end_if_dead(
        p_turn_id text, p_gateway_id text, p_now double precision, p_dead_before double precision
    ) RETURNS boolean LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    BEGIN
        UPDATE turns SET running = false, finish_reason = 'error', finished_at = p_now
        WHERE turns.turn_id = p_turn_id AND turns.running AND {_DEAD};
        RETURN FOUND OR NOT EXISTS (
            SELECT 1 FROM turns WHERE turns.turn_id = p_turn_id AND turns.running);
    END $$
    """,
    """
    CREATE FUNCTION get_turn(
        p_owner text, p_turn_id text, p_gateway_id text, p_now double precision,
        p_dead_before double precision
    ) RETURNS SETOF turn_records LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM turns WHERE turn_id = p_turn_id AND owner = p_owner) THEN
            PERFORM end_if_dead(p_turn_id, p_gateway_id, p_now, p_dead_before);
        END IF;
        RETURN QUERY SELECT * FROM turn_records WHERE turn_id = p_turn_id AND owner = p_owner;
    END $$
    """,
    """
    CREATE FUNCTION begin_turn(
        p_owner text, p_conversation_id text, p_new_conversation_id text, p_title text,
        p_content text, p_message_id text, p_turn_id text, p_answer_id text, p_model text,
        p_key text, p_key_expires_at double precision, p_gateway_id text,
        p_now double precision, p_dead_before double precision
    ) RETURNS SETOF turn_records LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_owned boolean := false;
        v_conversation text := p_conversation_id;
        v_earlier turns%ROWTYPE;
        v_running text;
        v_seq integer := 1;
    BEGIN
        IF p_conversation_id <> '' THEN
            PERFORM 1 FROM conversations
            WHERE id = p_conversation_id AND owner = p_owner FOR UPDATE;
            v_owned := FOUND;
        END IF;
        IF p_key <> '' THEN
            SELECT * INTO v_earlier FROM turns
            WHERE owner = p_owner AND idempotency_key = p_key;
            IF FOUND AND v_earlier.key_expires_at > p_now THEN
                PERFORM end_if_dead(v_earlier.turn_id, p_gateway_id, p_now, p_dead_before);
                RETURN QUERY SELECT * FROM turn_records WHERE turn_id = v_earlier.turn_id;
                RETURN;
            ELSIF FOUND THEN  -- expired: the key is free again
                UPDATE turns SET idempotency_key = NULL, key_expires_at = NULL
                WHERE turn_id = v_earlier.turn_id;
            END IF;
        END IF;
        IF p_conversation_id = '' THEN
            v_conversation := p_new_conversation_id;
            INSERT INTO conversations (id, owner, title, created_at, updated_at, last_seq)
            VALUES (v_conversation, p_owner, p_title, p_now, p_now, 1);
        ELSE
            IF NOT v_owned THEN
                RAISE EXCEPTION USING ERRCODE = 'TW404', MESSAGE = 'conversation not found';
            END IF;
            SELECT turn_id INTO v_running FROM turns
            WHERE conversation_id = v_conversation AND running;
            IF FOUND AND NOT end_if_dead(v_running, p_gateway_id, p_now, p_dead_before) THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'TW409', MESSAGE = 'conversation busy', DETAIL = v_running;
            END IF;
            UPDATE conversations
            SET updated_at = GREATEST(updated_at, p_now), last_seq = last_seq + 1
            WHERE id = v_conversation RETURNING last_seq INTO v_seq;
        END IF;
        INSERT INTO messages
            (id, conversation_id, seq, role, content, turn_id, complete, created_at)
        VALUES (p_message_id, v_conversation, v_seq, 'user', p_content, p_turn_id, true, p_now);
        INSERT INTO turns (turn_id, conversation_id, owner, idempotency_key, key_expires_at,
            user_message_id, answer_id, model, running, gateway_id, created_conversation,
            created_at)
        VALUES (p_turn_id, v_conversation, p_owner, NULLIF(p_key, ''),
            CASE WHEN p_key = '' THEN NULL ELSE p_key_expires_at END, p_message_id,
            p_answer_id, p_model, true, p_gateway_id, p_conversation_id = '', p_now);
        RETURN QUERY SELECT * FROM turn_records WHERE turn_id = p_turn_id;
    END $$
    """,
    """
    CREATE FUNCTION finish_turn(
        p_owner text, p_conversation_id text, p_turn_id text, p_answer_id text,
        p_answer text, p_complete boolean, p_finish_reason text, p_filter_category text,
        p_prompt_tokens integer, p_completion_tokens integer, p_now double precision
    ) RETURNS boolean LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_seq integer;
    BEGIN
        PERFORM 1 FROM conversations WHERE id = p_conversation_id AND owner = p_owner FOR UPDATE;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        UPDATE turns SET running = false, answer_id = p_answer_id,
            finish_reason = p_finish_reason, filter_category = p_filter_category,
            prompt_tokens = p_prompt_tokens, completion_tokens = p_completion_tokens,
            finished_at = p_now
        WHERE turn_id = p_turn_id AND conversation_id = p_conversation_id AND running;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        UPDATE conversations
        SET updated_at = GREATEST(updated_at, p_now), last_seq = last_seq + 1
        WHERE id = p_conversation_id RETURNING last_seq INTO v_seq;
        INSERT INTO messages
            (id, conversation_id, seq, role, content, turn_id, complete, created_at)
        VALUES (p_answer_id, p_conversation_id, v_seq, 'assistant', p_answer, p_turn_id,
            p_complete, p_now);
        RETURN true;
    END $$
    """,
    """
    CREATE FUNCTION discard_turn(p_owner text, p_conversation_id text, p_turn_id text)
    RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_message text;
        v_created boolean;
        v_seq integer;
    BEGIN
        PERFORM 1 FROM conversations WHERE id = p_conversation_id AND owner = p_owner FOR UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        DELETE FROM turns
        WHERE turn_id = p_turn_id AND conversation_id = p_conversation_id AND running
        RETURNING user_message_id, created_conversation INTO v_message, v_created;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        DELETE FROM messages WHERE id = v_message RETURNING seq INTO v_seq;
        IF v_created
            AND NOT EXISTS (SELECT 1 FROM messages WHERE conversation_id = p_conversation_id)
            AND NOT EXISTS (SELECT 1 FROM turns WHERE conversation_id = p_conversation_id)
        THEN
            DELETE FROM conversations WHERE id = p_conversation_id;
        ELSE  -- the seq is free again when it was the last one
            UPDATE conversations SET last_seq = last_seq - 1
            WHERE id = p_conversation_id AND last_seq = v_seq;
        END IF;
    END $$
    """,
)

_USAGE: Final = (
    # One row per turn that reached the engine (see tokenwire.stores.usage). No foreign
    # key to turns: usage outlives a deleted conversation.
    """
    CREATE TABLE usage_records (
        turn_id            text PRIMARY KEY,
        tenant             text NOT NULL,
        user_name          text NOT NULL,
        api_key_id         text NOT NULL,
        model              text NOT NULL,
        finish_reason      text NOT NULL,
        prompt_tokens      bigint NOT NULL,
        completion_tokens  bigint NOT NULL,
        recorded_at        double precision NOT NULL
    )
    """,
    "CREATE INDEX usage_records_time ON usage_records (recorded_at)",
    "CREATE INDEX usage_records_tenant_time ON usage_records (tenant, recorded_at)",
)

_MODERATION_EVENTS: Final = (
    # One row per flagged moderation check (see tokenwire.stores.moderation_events),
    # listed newest first. No foreign key to turns: events outlive a deleted conversation.
    """
    CREATE TABLE moderation_events (
        event_id     text PRIMARY KEY,
        recorded_at  double precision NOT NULL,
        tenant       text NOT NULL,
        user_name    text NOT NULL,
        turn_id      text NOT NULL,
        direction    text NOT NULL,
        category     text NOT NULL,
        moderator    text NOT NULL,
        score        double precision NOT NULL,
        action       text NOT NULL,
        text         text NOT NULL
    )
    """,
    "CREATE INDEX moderation_events_time ON moderation_events (recorded_at, event_id)",
    """
    CREATE INDEX moderation_events_account
        ON moderation_events (tenant, user_name, recorded_at, event_id)
    """,
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: conversations, messages, turns, gateways and the turn functions.
    (*_TABLES, *_FUNCTIONS),
    # 2: usage records.
    _USAGE,
    # 3: flagged moderation events.
    _MODERATION_EVENTS,
)
"""Schema migrations in order; migration ``n`` (1-based) is recorded as version ``n``."""


def check_schema_name(schema: str) -> str:
    """``schema`` double-quoted for SQL; ConfigError unless it is a plain lowercase name."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigError(
            "store.postgres_schema must be a lowercase name of letters, digits and '_'"
            f" (at most 63), got {schema[:80]!r}"
        )
    return f'"{schema}"'


async def migrate(conn: Any, schema: str, migrations: tuple[tuple[str, ...], ...]) -> None:
    """Create ``schema`` if missing and apply the migrations it has not seen, on the
    asyncpg connection ``conn``, in one transaction under an advisory lock.

    ConfigError when the schema is newer than ``migrations`` know.
    """
    quoted = check_schema_name(schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", _MIGRATION_LOCK, schema
        )
        # Checked first: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even
        # when the schema is there.
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        ):
            await conn.execute(f"CREATE SCHEMA {quoted}")
        await conn.execute(f"SET LOCAL search_path TO {quoted}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        if current > len(migrations):
            raise ConfigError(
                f"conversation schema {schema!r} is at version {current}, newer than this"
                f" tokenwire knows ({len(migrations)}); upgrade tokenwire"
            )
        for version in range(current + 1, len(migrations) + 1):
            for statement in migrations[version - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
