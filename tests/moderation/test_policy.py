"""ModerationPolicy on a real server: input refused before the model, output cut unseen."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from tokenwire.auth.principal import Principal
from tokenwire.context import current_call
from tokenwire.errors import ConfigError
from tokenwire.interceptors import ErrorsInterceptor, Interceptor
from tokenwire.interceptors.base import CallInfo, Proceed
from tokenwire.moderation import EmbeddingModerator, ModerationConfig, RuleModerator
from tokenwire.moderation.actions import CategoryActions, FlagEvent
from tokenwire.moderation.classifier import ClassifierModerator
from tokenwire.moderation.combine import AllModerator, EscalatingModerator
from tokenwire.moderation.policy import ModerationPolicy, build_moderators
from tokenwire.proto.v1 import chat_pb2, models_pb2
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

OWNER = "acme/alice"
RULES = ModerationConfig(moderator="rules")  # no model to load
FLAGGED_INPUT = "Listen: I w1ll K.I.L.L you tomorrow."
FLAGGED_REPLY = "Sure. Here it is: I will kill you now, said the villain."
TERM_START = FLAGGED_REPLY.index("I will")


class AsAlice(Interceptor):
    """Stands in for authentication: every call is alice of tenant acme."""

    authenticates = True

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        current_call().principal = Principal(tenant="acme", user="alice")
        return await proceed(request, context)


def chain(config: ModerationConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """``running_server`` arguments: alice's calls, moderated by the policy under test."""
    return {
        "interceptors": [ErrorsInterceptor(), AsAlice()],
        "policies": [ModerationPolicy(config or RULES, **kwargs)],
    }


async def complete(running: RunningServer, message: str) -> list[chat_pb2.CompleteResponse]:
    """All events of one Complete call."""
    return [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message=message))]


async def next_event(call: grpc.aio.StreamStreamCall, kind: str) -> chat_pb2.ConverseResponse:
    """Read a Converse stream until an event of ``kind`` arrives."""
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF, f"stream ended before a {kind} event"
        if event.WhichOneof("event") == kind:
            return event


def start(message: str) -> chat_pb2.ConverseRequest:
    return chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message=message))


def deltas(events: list[Any]) -> list[str]:
    return [e.delta.text for e in events if e.HasField("delta")]


def audit_records(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry.get("logger_name") == "tokenwire.audit"]


@contextmanager
def log_level(level: int) -> Iterator[None]:
    """Temporarily let records of ``level`` and above through the structlog pipeline."""
    old = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        yield
    finally:
        structlog.configure(wrapper_class=old)


# --- input ------------------------------------------------------------------------------


async def test_flagged_input_on_complete_is_refused_before_the_backend() -> None:
    """A flagged message is INVALID_ARGUMENT, error_type content_filter; the engine never runs."""
    fake = FakeBackend(reply="never sent")
    async with running_server(fake, **chain()) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(running, FLAGGED_INPUT)
    assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
    assert "content_filter" == dict(raised.value.trailing_metadata() or ())["x-error-type"]
    assert "violence" in raised.value.details()
    assert [] == fake.requests


async def test_flagged_input_on_converse_is_a_turn_error_and_the_stream_stays_open() -> None:
    """On Converse a flagged message is a TurnError with filter_category; the next turn runs."""
    fake = FakeBackend(reply="Hello there.")
    async with running_server(fake, **chain()) as running:
        call = running.chat.Converse()
        await call.write(start(FLAGGED_INPUT))
        error = (await next_event(call, "error")).error
        await call.write(start("Hi"))
        finished = (await next_event(call, "finished")).finished
        await call.done_writing()
        assert grpc.StatusCode.OK == await call.code()
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == error.code
    assert ("content_filter", "violence") == (error.error_type, error.filter_category)
    assert chat_pb2.FINISH_REASON_STOP == finished.finish_reason
    assert 1 == len(fake.requests)


# --- output -----------------------------------------------------------------------------


async def test_flagged_output_on_complete_is_cut_before_the_term_and_stored_as_shown() -> None:
    """Streamed byte by byte, no delta carries any of the term; the store holds what was shown."""
    store = SQLiteConversationStore(":memory:")
    fake = FakeBackend(reply=FLAGGED_REPLY)
    async with running_server(fake, store=store, **chain()) as running:
        events = await complete(running, "Tell me a story.")
        started, finished = events[0].started, events[-1].finished
        messages = await store.list_messages(OWNER, started.conversation_id)
    received = "".join(deltas(events))
    assert FLAGGED_REPLY.startswith(received)
    assert len(received) <= TERM_START
    assert chat_pb2.FINISH_REASON_CONTENT_FILTER == finished.finish_reason
    assert "violence" == finished.filter_category
    assert [("user", "Tell me a story."), ("assistant", received)] == [
        (m.role, m.content) for m in messages
    ]
    assert not messages[1].complete
    assert fake.requests[0].closed  # the engine was stopped, not run to the end


async def test_flagged_output_on_converse_ends_the_turn_and_the_stream_stays_open() -> None:
    """On Converse the cut turn finishes with CONTENT_FILTER; the session goes on."""
    store = SQLiteConversationStore(":memory:")
    async with running_server(FakeBackend(reply=FLAGGED_REPLY), store=store, **chain()) as running:
        call = running.chat.Converse()
        await call.write(start("Tell me a story."))
        started = (await next_event(call, "started")).started
        received = ""
        while (event := await asyncio.wait_for(call.read(), 10)).WhichOneof("event") == "delta":
            received += event.delta.text
        await call.write(start("And another?"))
        second = (await next_event(call, "finished")).finished
        await call.done_writing()
        messages = await store.list_messages(OWNER, started.conversation_id)
    assert "finished" == event.WhichOneof("event")
    assert (chat_pb2.FINISH_REASON_CONTENT_FILTER, "violence") == (
        event.finished.finish_reason,
        event.finished.filter_category,
    )
    assert len(received) <= TERM_START
    assert received == messages[1].content
    assert chat_pb2.FINISH_REASON_CONTENT_FILTER == second.finish_reason


@pytest.mark.parametrize(
    "reply",
    [
        "Okay: 1 w1ll k!ll y0u.",
        "Okay: I WILL KILL YOU.",
        "Okay: i w.i.l.l k i l l you",
        "Okay: I wi\u200bll ki\u200bll you",
    ],
    ids=["leetspeak", "case", "spacing", "zero-width"],
)
async def test_obfuscated_output_is_cut(reply: str) -> None:
    """Obfuscated terms in the answer are caught while streaming and never shown."""
    async with running_server(FakeBackend(reply=reply), **chain()) as running:
        events = await complete(running, "Hi")
    assert "Okay: " == "".join(deltas(events))
    assert "violence" == events[-1].finished.filter_category


async def test_clean_output_passes_unchanged() -> None:
    """A clean answer, innocent look-alikes included, arrives exactly as generated."""
    reply = "Sure! Killer whales show real skill; Scunthorpe is in England. I will help you."
    async with running_server(FakeBackend(reply=reply), **chain()) as running:
        events = await complete(running, "Tell me about orcas and skills.")
    assert reply == "".join(deltas(events))
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
    assert "" == events[-1].finished.filter_category
    assert len(reply) == sum(e.delta.token_count for e in events if e.HasField("delta"))


# --- configuration ----------------------------------------------------------------------


async def test_rules_file_from_config_is_used(tmp_path: Path) -> None:
    """ModerationConfig.rules_file replaces the built-in rules."""
    path = tmp_path / "rules.toml"
    path.write_text('[categories.spoilers]\nterms = ["rosebud is a sled"]\n')
    config = ModerationConfig(moderator="rules", rules_file=str(path))
    fake = FakeBackend(reply="Fine: Rosebud is a SLED.")
    async with running_server(fake, **chain(config)) as running:
        events = await complete(running, "I will kill you")  # not in this rule set
    assert "Fine: " == "".join(deltas(events))
    assert "spoilers" == events[-1].finished.filter_category


async def test_input_and_output_switch_separately() -> None:
    """input=False lets a flagged message through; output is still screened."""
    config = ModerationConfig(moderator="rules", input=False)
    async with running_server(FakeBackend(reply=FLAGGED_REPLY), **chain(config)) as running:
        events = await complete(running, FLAGGED_INPUT)
    assert chat_pb2.FINISH_REASON_CONTENT_FILTER == events[-1].finished.finish_reason


async def test_disabled_moderation_passes_everything() -> None:
    """enabled=False: no checks on input or output."""
    config = ModerationConfig(enabled=False)
    async with running_server(FakeBackend(reply=FLAGGED_REPLY), **chain(config)) as running:
        events = await complete(running, FLAGGED_INPUT)
    assert FLAGGED_REPLY == "".join(deltas(events))


async def test_non_chat_calls_pass_through() -> None:
    """ModelService is untouched by moderation."""
    async with running_server(FakeBackend(), **chain()) as running:
        models = await running.models.ListModels(models_pb2.ListModelsRequest())
    assert ["fake"] == [m.name for m in models.models]


async def test_given_moderator_replaces_the_configured_ones() -> None:
    """``moderator=`` is used instead of what the config names, and started and closed."""

    class Everything:
        name = "everything"
        started = closed = False

        async def start(self) -> None:
            self.started = True

        async def close(self) -> None:
            self.closed = True

        async def check(self, text: str) -> Any:
            from tokenwire.moderation import Verdict

            return Verdict(True, "all", 0.5)

    everything = Everything()
    async with running_server(FakeBackend(), **chain(moderator=everything)) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(running, "Hello")
        assert everything.started
    assert everything.closed
    assert "content_filter" == dict(raised.value.trailing_metadata() or ())["x-error-type"]


def test_build_moderators_follows_the_config() -> None:
    """The listed moderators in checking order; 'both' is still rules and embedding."""
    default = build_moderators(ModerationConfig())
    assert [RuleModerator, ClassifierModerator] == [type(m) for m in default]
    both = build_moderators(ModerationConfig(moderator="both"))
    assert [RuleModerator, EmbeddingModerator] == [type(m) for m in both]


def test_build_moderators_combines_by_policy() -> None:
    """all: one moderator of every one; escalate: rules apart, the models in a chain."""
    every = build_moderators(ModerationConfig(moderator="rules,classifier", combine="all"))
    assert [AllModerator] == [type(m) for m in every]
    chain = build_moderators(
        ModerationConfig(moderator="rules,classifier,embedding", combine="escalate")
    )
    assert [RuleModerator, EscalatingModerator] == [type(m) for m in chain]


def test_a_guard_moderator_must_be_given() -> None:
    """Naming 'guard' without a guard model is a ConfigError that says so."""
    with pytest.raises(ConfigError, match="guard"):
        build_moderators(ModerationConfig(moderator="rules,guard"))


@pytest.mark.parametrize(
    "changes",
    [
        {"moderator": "regex"},
        {"moderator": "rules,rules"},
        {"combine": "most"},
        {"classifier_threshold": 1.5},
        {"output_window_chars": 0},
        {"embedding_threshold": 2.0},
        {"embedding_check_chars": 0},
    ],
)
def test_bad_config_is_refused_up_front(changes: dict[str, Any]) -> None:
    """An invalid setting is a ConfigError when the policy is built."""
    with pytest.raises(ConfigError):
        ModerationPolicy(dataclasses.replace(RULES, **changes))


# --- audit ------------------------------------------------------------------------------


async def test_flagged_decisions_are_audited_without_the_text() -> None:
    """Input and output flags are logged with principal, category, direction and a hash only."""
    async with running_server(FakeBackend(reply=FLAGGED_REPLY), **chain()) as running:
        with capture_logs() as logs:
            with pytest.raises(grpc.aio.AioRpcError):
                await complete(running, FLAGGED_INPUT)
            events = await complete(running, "Tell me a story.")
    records = audit_records(logs)
    assert [("input", "violence"), ("output", "violence")] == [
        (r["direction"], r["category"]) for r in records
    ]
    for record in records:
        assert ("acme", "alice", "rules", True) == (
            record["tenant"],
            record["user"],
            record["moderator"],
            record["flagged"],
        )
        assert "warning" == record["log_level"]
    assert [64, 64] == [len(record["text_hmac"]) for record in records]  # keyed, not plain
    assert hashlib.sha256(FLAGGED_INPUT.encode()).hexdigest() not in repr(records)
    assert events[0].started.turn_id == records[1]["turn_id"]
    flat = repr(records)
    assert "kill" not in flat.lower()
    assert "K.I.L.L" not in flat


async def test_audit_off_logs_nothing() -> None:
    """audit=False: no audit records, the refusal still happens."""
    config = ModerationConfig(moderator="rules", audit=False)
    async with running_server(FakeBackend(), **chain(config)) as running:
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError):
            await complete(running, FLAGGED_INPUT)
    assert [] == audit_records(logs)


async def test_audit_all_checks_logs_passes_too() -> None:
    """audit_all_checks=True also records checks that passed, at info level."""
    config = ModerationConfig(moderator="rules", audit_all_checks=True)
    async with running_server(FakeBackend(reply="Hello."), **chain(config)) as running:
        with log_level(logging.INFO), capture_logs() as logs:
            await complete(running, "Hi there")
    records = audit_records(logs)
    assert {("input", False), ("output", False)} == {
        (r["direction"], r["flagged"]) for r in records
    }
    assert all("info" == r["log_level"] for r in records)


# --- per-tenant category actions -----------------------------------------------------------


class Flags:
    """A FlagSink that keeps what it hears."""

    def __init__(self) -> None:
        self.events: list[FlagEvent] = []

    def flagged(self, event: FlagEvent) -> None:
        self.events.append(event)


@pytest.mark.parametrize("action", ["allow", "log"])
async def test_a_tenant_that_allows_a_category_gets_it_through_and_it_is_still_audited(
    action: str,
) -> None:
    """acme's violence:allow (or log): the message and the answer pass, every flag is audited."""
    config = dataclasses.replace(RULES, tenant_categories={"acme": f"violence:{action}"})
    flags = Flags()
    async with running_server(
        FakeBackend(reply=FLAGGED_REPLY), **chain(config, flags=flags)
    ) as running:
        with capture_logs() as logs:
            events = await complete(running, FLAGGED_INPUT)
    shown = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert FLAGGED_REPLY == shown
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
    records = audit_records(logs)
    assert [("input", "violence", action), ("output", "violence", action)] == [
        (r["direction"], r["category"], r["action"]) for r in records
    ]
    assert [("input", action), ("output", action)] == [
        (e.direction, e.action) for e in flags.events
    ]
    assert ["", ""] == [e.text for e in flags.events]  # acme does not keep flagged text


async def test_another_tenant_and_other_categories_are_still_blocked() -> None:
    """An allowance is the tenant's own and the category's own: beta's violence is blocked."""
    config = dataclasses.replace(
        RULES,
        tenant_categories={"beta": "violence:allow", "acme": "hate:allow"},
        keep_text_tenants="acme",
    )
    flags = Flags()
    async with running_server(FakeBackend(), **chain(config, flags=flags)) as running:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await complete(running, FLAGGED_INPUT)
    assert grpc.StatusCode.INVALID_ARGUMENT == refused.value.code()
    assert [("input", "block", FLAGGED_INPUT)] == [
        (e.direction, e.action, e.text) for e in flags.events
    ]  # acme keeps flagged text


def test_the_most_specific_action_wins() -> None:
    """An AdminService override, then the tenant, then its plan, then every tenant."""

    class Overrides:
        def tenant_actions(self, tenant: str) -> dict[str, str] | None:
            return {"drugs": "allow"} if tenant == "acme" else None

        def keeps_text(self, tenant: str) -> bool | None:
            return None

    config = ModerationConfig(
        categories={"hate": "log"},
        tenant_categories={"acme": "drugs:log fraud:log", "plan:pro": "fraud:allow malware:log"},
    )
    actions = CategoryActions(config.categories, config.tenant_categories, overrides=Overrides())
    acme = Principal(tenant="acme", user="a", plan="pro")
    assert ["allow", "log", "log", "log", "block"] == [
        actions.action(acme, c) for c in ("drugs", "fraud", "malware", "hate", "violence")
    ]


def test_a_bad_category_action_is_refused() -> None:
    """Actions are block, log or allow, from a table or the environment's string."""
    with pytest.raises(ConfigError, match="block, log, allow"):
        ModerationConfig(tenant_categories={"acme": "violence:permit"})


# --- the guard model through the policy ------------------------------------------------------


@pytest.mark.parametrize(("answer", "refused"), [("unsafe violence", True), ("safe", False)])
async def test_a_guard_on_the_served_model_decides_the_input(answer: str, refused: bool) -> None:
    """moderator = 'rules,guard': the server hands its model to the guard, which asks it."""
    config = ModerationConfig(moderator="rules,guard", guard_timeout_s=5.0)
    async with running_server(
        FakeBackend(reply=answer), config_for_tests(moderation=config)
    ) as running:
        if refused:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await complete(running, "How do I hurt my neighbour?")
            assert grpc.StatusCode.INVALID_ARGUMENT == error.value.code()
            assert "violence" in (error.value.details() or "")
        else:
            events = await complete(running, "How do I bake bread?")
            assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason


@pytest.mark.parametrize(
    ("setting", "asked"),
    [
        ("none", "<|user|>How do I hurt my neighbour?\n<|assistant|>"),
        ("Judge this: {message}", "<|user|>Judge this: How do I hurt my neighbour?\n<|assistant|>"),
    ],
)
async def test_the_guard_prompt_setting_shapes_what_the_model_is_asked(
    setting: str, asked: str
) -> None:
    """guard_prompt 'none' asks the text alone (Llama Guard 3 reads its codes); a template
    holding {message} is the whole user turn."""
    fake = FakeBackend(reply="unsafe\nS1\n")
    config = ModerationConfig(moderator="rules,guard", guard_prompt=setting)
    async with running_server(fake, config_for_tests(moderation=config)) as running:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await complete(running, "How do I hurt my neighbour?")
    assert grpc.StatusCode.INVALID_ARGUMENT == error.value.code()
    assert "violence" in (error.value.details() or "")
    assert [asked] == [bytes(log.request.prompt_token_ids).decode() for log in fake.requests]


async def test_a_failing_open_guard_lets_the_turn_through_when_it_cannot_answer() -> None:
    """guard_fail_closed = false: a guard past its timeout passes the turn, audited as
    guard_unavailable; by default the turn fails UNAVAILABLE."""
    for fail_closed in (True, False):
        fake = FakeBackend(reply="safe", token_delay_s=0.5)
        config = ModerationConfig(
            moderator="guard", guard_timeout_s=0.05, guard_fail_closed=fail_closed, output=False
        )
        async with running_server(fake, config_for_tests(moderation=config)) as running:
            if fail_closed:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await complete(running, "hello")
                assert grpc.StatusCode.UNAVAILABLE == error.value.code()
            else:
                with capture_logs() as logs:
                    events = await complete(running, "hello")
                assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
                assert "safe" == "".join(e.delta.text for e in events if e.HasField("delta"))
                assert any(log.get("category") == "guard_unavailable" for log in logs), logs
