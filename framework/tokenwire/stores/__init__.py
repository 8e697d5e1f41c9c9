"""Conversation stores: where a conversation's history is kept between turns.

:class:`ConversationStore` is the contract; :class:`SQLiteConversationStore`
is the embedded default (one file, no server). Example::

    from tokenwire.stores import SQLiteConversationStore

    async with SQLiteConversationStore("var/conversations.db") as store:
        conv = await store.create_conversation("alice", title="New chat")
"""

from tokenwire.stores.conversations import (
    MAX_ID_LENGTH,
    MESSAGE_ROLES,
    Conversation,
    ConversationStore,
    StoreClosedError,
    StoredMessage,
    conversation_not_found,
    is_valid_id,
    new_id,
    validate_limit,
    validate_message_id,
    validate_role,
)
from tokenwire.stores.sqlite import SQLiteConversationStore

__all__ = [
    "MAX_ID_LENGTH",
    "MESSAGE_ROLES",
    "Conversation",
    "ConversationStore",
    "SQLiteConversationStore",
    "StoreClosedError",
    "StoredMessage",
    "conversation_not_found",
    "is_valid_id",
    "new_id",
    "validate_limit",
    "validate_message_id",
    "validate_role",
]
