"""``tokenwire.v1.ConversationService``: the caller's conversations, read back and followed live.

Every call acts on the authenticated principal's own conversations (the store
checks the owner in the same statement that reads): another principal's
conversation is NOT_FOUND, exactly like one that does not exist::

    conversations_pb2_grpc.add_ConversationServiceServicer_to_server(
        ConversationServicer(store, live), server
    )
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import grpc

from tokenwire.backend import FinishReason
from tokenwire.context import current_principal
from tokenwire.errors import InvalidArgumentError, UnavailableError
from tokenwire.live.bus import Lagged, LiveBus, LiveEvent
from tokenwire.proto.v1 import chat_pb2, conversations_pb2, conversations_pb2_grpc
from tokenwire.services.convert import finished_message, started_message
from tokenwire.stores.conversations import Conversation, ConversationStore, StoredMessage
from tokenwire.streams import closing
from tokenwire.turns.events import Finished, Started, Usage

__all__ = [
    "CONVERSATION_SERVICE_NAME",
    "MAX_CONVERSATIONS_PAGE",
    "MAX_MESSAGES_PAGE",
    "ConversationServicer",
]

CONVERSATION_SERVICE_NAME: Final = conversations_pb2.DESCRIPTOR.services_by_name[
    "ConversationService"
].full_name
DEFAULT_CONVERSATIONS_PAGE: Final = 20
MAX_CONVERSATIONS_PAGE: Final = 100
DEFAULT_MESSAGES_PAGE: Final = 50
MAX_MESSAGES_PAGE: Final = 500
_MAX_PAGE_TOKEN_BYTES: Final = 512
Context = grpc.aio.ServicerContext[Any, Any]


def _page_size(requested: int, default: int, most: int) -> int:
    """0: the default; above the bound: the bound (as AIP-158 coerces); negative: refused."""
    if requested < 0:
        raise InvalidArgumentError(f"page_size must be >= 0, got {requested}")
    return min(requested or default, most)


def _page_token(token: str) -> str:
    if len(token) > _MAX_PAGE_TOKEN_BYTES:
        raise InvalidArgumentError("page_token is not one this server issued")
    return token


def conversation_message(conversation: Conversation) -> conversations_pb2.Conversation:
    """The wire form of a stored conversation."""
    return conversations_pb2.Conversation(
        id=conversation.id,
        title=conversation.title,
        create_time=conversation.created_at,
        update_time=conversation.updated_at,
    )


def message_message(message: StoredMessage) -> conversations_pb2.Message:
    """The wire form of a stored message."""
    return conversations_pb2.Message(
        id=message.id,
        role=message.role,
        content=message.content,
        turn_id=message.turn_id,
        complete=message.complete,
        create_time=message.created_at,
    )


def watch_response(
    conversation_id: str, item: LiveEvent | Lagged
) -> conversations_pb2.WatchConversationResponse:
    """One live event as a WatchConversation message."""
    response = conversations_pb2.WatchConversationResponse
    if isinstance(item, Lagged):
        return response(lagged=conversations_pb2.WatchLagged(reason=item.reason))
    if item.kind == "delta":
        return response(
            turn_id=item.turn_id,
            delta=chat_pb2.Delta(text=item.text, token_count=item.token_count),
        )
    if item.kind == "started":
        user = conversations_pb2.Message(
            id=item.user_message_id,
            role="user",
            content=item.user_text,
            turn_id=item.turn_id,
            complete=True,
            create_time=item.created_at,
        )
        started = started_message(
            Started(item.turn_id, conversation_id, item.answer_id, item.model)
        )
        return response(
            turn_id=item.turn_id,
            turn=conversations_pb2.WatchedTurn(started=started, user_message=user),
        )
    finished = Finished(
        item.turn_id,
        FinishReason(item.finish_reason),
        Usage(item.prompt_tokens, item.completion_tokens, item.ttft_ms),
        item.filter_category,
    )
    return response(turn_id=item.turn_id, finished=finished_message(finished))


class ConversationServicer(conversations_pb2_grpc.ConversationServiceServicer):
    """Serves ``store``'s conversations to their owners; follows them on ``live``."""

    def __init__(self, store: ConversationStore, live: LiveBus) -> None:
        self._store = store
        self._live = live

    async def ListConversations(
        self, request: conversations_pb2.ListConversationsRequest, context: Context
    ) -> conversations_pb2.ListConversationsResponse:
        page = await self._store.list_conversations(
            current_principal().owner,
            page_size=_page_size(
                request.page_size, DEFAULT_CONVERSATIONS_PAGE, MAX_CONVERSATIONS_PAGE
            ),
            cursor=_page_token(request.page_token),
        )
        return conversations_pb2.ListConversationsResponse(
            conversations=[conversation_message(c) for c in page.items],
            next_page_token=page.next_cursor,
        )

    async def GetConversation(
        self, request: conversations_pb2.GetConversationRequest, context: Context
    ) -> conversations_pb2.Conversation:
        conversation = await self._store.get_conversation(
            current_principal().owner, request.conversation_id
        )
        return conversation_message(conversation)

    async def UpdateConversation(
        self, request: conversations_pb2.UpdateConversationRequest, context: Context
    ) -> conversations_pb2.Conversation:
        conversation = await self._store.rename_conversation(
            current_principal().owner, request.conversation_id, request.title
        )
        return conversation_message(conversation)

    async def DeleteConversation(
        self, request: conversations_pb2.DeleteConversationRequest, context: Context
    ) -> conversations_pb2.DeleteConversationResponse:
        await self._store.delete_conversation(current_principal().owner, request.conversation_id)
        return conversations_pb2.DeleteConversationResponse()

    async def ListMessages(
        self, request: conversations_pb2.ListMessagesRequest, context: Context
    ) -> conversations_pb2.ListMessagesResponse:
        page = await self._store.page_messages(
            current_principal().owner,
            request.conversation_id,
            page_size=_page_size(request.page_size, DEFAULT_MESSAGES_PAGE, MAX_MESSAGES_PAGE),
            cursor=_page_token(request.page_token),
        )
        return conversations_pb2.ListMessagesResponse(
            messages=[message_message(m) for m in page.items],
            next_page_token=page.next_cursor,
        )

    async def WatchConversation(
        self, request: conversations_pb2.WatchConversationRequest, context: Context
    ) -> AsyncIterator[conversations_pb2.WatchConversationResponse]:
        conversation_id = request.conversation_id
        # Ownership first: NOT_FOUND before any event, and nothing to follow for others.
        await self._store.get_conversation(current_principal().owner, conversation_id)
        # The bus never waits for a slow watcher: this one falls behind and is told so.
        async with closing(self._live.follow(conversation_id)) as events:
            expected: dict[str, int] = {}  # turn id → characters of its answer seen
            async for item in events:
                if isinstance(item, LiveEvent) and item.kind != "started":
                    seen = expected.get(item.turn_id)
                    if seen is not None and seen != item.offset:
                        # An event went missing on the bus: say so, as for a lag.
                        yield watch_response(
                            conversation_id,
                            Lagged(f"missed part of turn {item.turn_id}'s answer"),
                        )
                    expected[item.turn_id] = item.offset + len(item.text)
                    if item.kind == "finished":
                        del expected[item.turn_id]
                elif isinstance(item, LiveEvent):
                    expected[item.turn_id] = 0
                yield watch_response(conversation_id, item)
        # The bus closed under us: this server is going away; watch again elsewhere.
        raise UnavailableError("the server is shutting down; watch the conversation again")
