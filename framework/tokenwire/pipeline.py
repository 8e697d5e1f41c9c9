"""The one place that declares what every call and every turn passes through.

Two levels, in a fixed order:

* **interceptors**, per call, outermost first: errors + logging (binds the call
  state, maps every error to a status) → metrics (with ``metrics.enabled``: open
  streams, refused calls) → authentication (who is calling, may they call this
  method) → suspension (with ``abuse.enabled``: a suspended principal is refused
  every call) → quotas (requests and stream slots);
* **turn policies**, per turn, in order: metrics (with ``metrics.enabled``; they
  only watch) → credentials checked again (a long-lived stream's key may be
  revoked) → abuse (with ``abuse.enabled``: a suspended principal's turn, and a
  throttled one's beyond its rate, refused) → quotas (count the turn, reserve and
  settle tokens) → usage (the tenant's token budget; the turn's usage recorded
  when it ends) → moderation (the message in, the answer out; every flag goes to
  the abuse monitor, which counts it and keeps the event).

The server hands the policies to the turn runner itself, so a turn never runs
without them, whatever chain a program assembles. A chain it cannot serve
safely is refused at start (:func:`check_chain`)::

    pipeline = build_pipeline(config)
    server = grpc.aio.server(interceptors=[InterceptorChain(pipeline.interceptors)])
    runner = TurnRunner(models, store, config.limits, pipeline.policies)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenwire.abuse import build_abuse_monitor
from tokenwire.abuse.interceptor import SuspensionInterceptor
from tokenwire.abuse.monitor import AbuseMonitor
from tokenwire.abuse.policy import AbusePolicy
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.auth.policy import CredentialPolicy
from tokenwire.config import Config
from tokenwire.errors import ConfigError
from tokenwire.interceptors.base import Interceptor
from tokenwire.interceptors.errors import ErrorsInterceptor
from tokenwire.metrics.interceptor import MetricsInterceptor
from tokenwire.metrics.policy import MetricsPolicy
from tokenwire.metrics.registry import Metrics
from tokenwire.moderation.policy import ModerationPolicy
from tokenwire.quotas.interceptor import QuotaInterceptor
from tokenwire.quotas.policy import QuotaPolicy
from tokenwire.stores.conversations import ConversationStore
from tokenwire.turns.policy import TurnPolicy
from tokenwire.usage.policy import build_usage_policy

__all__ = ["Pipeline", "build_pipeline", "check_chain"]


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The interceptor chain (outermost first) and the turn policies (in order)."""

    interceptors: tuple[Interceptor, ...]
    policies: tuple[TurnPolicy, ...]
    metrics: Metrics | None = None  # with metrics.enabled: what the chain and policies count
    abuse: AbuseMonitor | None = None  # with abuse.enabled: flags, standings, tenant policies

    @property
    def auth(self) -> AuthInterceptor | None:
        """The chain's AuthInterceptor; None when another interceptor authenticates."""
        return next((i for i in self.interceptors if isinstance(i, AuthInterceptor)), None)


def build_pipeline(
    config: Config,
    *,
    interceptors: Sequence[Interceptor] | None = None,
    policies: Sequence[TurnPolicy] | None = None,
    store: ConversationStore | None = None,
) -> Pipeline:
    """The chain and policies ``config`` asks for.

    ``interceptors`` replaces the chain (it must still pass :func:`check_chain`);
    the turn policies are still those of ``config`` unless ``policies`` replaces
    them too: a custom chain never turns quotas or moderation off (nor the per-turn
    abuse checks: without a :class:`SuspensionInterceptor` of its own, a suspended
    principal is still refused every turn). ``store`` is where the usage policy
    records each turn (without one it only enforces budgets) and the abuse monitor
    keeps flag events.
    """
    auth: AuthInterceptor | None
    quotas: QuotaInterceptor | None
    metrics = (
        Metrics(tenant_labels=config.metrics.tenant_labels) if config.metrics.enabled else None
    )
    abuse: AbuseMonitor | None
    if interceptors is None:
        auth = AuthInterceptor(config.auth, config.store.data_dir)
        quotas = QuotaInterceptor(config.quotas) if config.quotas.enabled else None
        abuse = build_abuse_monitor(config.abuse, config.quotas, events=store)
        chain: list[Interceptor] = [
            ErrorsInterceptor(),
            # Right after the errors interceptor: it sees what auth and quotas refuse.
            *([MetricsInterceptor(metrics)] if metrics else []),
            auth,
            # Right after authentication (it needs the caller), before quotas (a
            # suspended principal's call counts against nothing).
            *([SuspensionInterceptor(abuse)] if abuse else []),
            *([quotas] if quotas else []),
        ]
    else:
        chain = list(interceptors)
        check_chain(chain)
        auth = next((i for i in chain if isinstance(i, AuthInterceptor)), None)
        # The chain's own quota interceptor counts the turns too; without one, the
        # configured quotas still apply per turn.
        quotas = next((i for i in chain if isinstance(i, QuotaInterceptor)), None)
        if quotas is None and config.quotas.enabled:
            quotas = QuotaInterceptor(config.quotas)
        # Likewise the chain's own suspension interceptor shares its monitor.
        suspension = next((i for i in chain if isinstance(i, SuspensionInterceptor)), None)
        abuse = suspension.monitor if suspension is not None else None
    if policies is None:
        if abuse is None and interceptors is not None:
            # A chain without a suspension interceptor: turns are still checked.
            abuse = build_abuse_monitor(config.abuse, config.quotas, events=store)
        # Metrics first: they see every turn a later policy admits or refuses.
        turn_policies: list[TurnPolicy] = [MetricsPolicy(metrics)] if metrics else []
        if auth is not None:  # another authenticating interceptor checks its own
            turn_policies.append(CredentialPolicy(auth))
        # After the credential check (a revoked key is told so first), before quotas
        # (a suspended or throttled turn takes no quota, budget or moderation work).
        if abuse is not None:
            turn_policies.append(AbusePolicy(abuse))
        if quotas is not None:
            turn_policies.append(QuotaPolicy(quotas))
        # After quotas (a turn over its per-minute quota never touches the budget),
        # before moderation (a turn refused there is refunded in after_turn).
        usage = build_usage_policy(
            config.usage,
            store,
            quotas=config.quotas,
            quota_store=quotas.store if quotas is not None else None,
            keys=auth.key_store if auth is not None else None,
        )
        if usage is not None:
            turn_policies.append(usage)
        if config.moderation.enabled:
            # The abuse monitor hears every flag (it counts and keeps them) and answers
            # the per-tenant policies set through AdminService.
            turn_policies.append(
                ModerationPolicy(
                    config.moderation,
                    data_dir=config.store.data_dir,
                    flags=abuse,
                    overrides=abuse,
                    router=config.router,  # a guard model on workers of its own
                )
            )
    else:
        turn_policies = list(policies)
    return Pipeline(tuple(chain), tuple(turn_policies), metrics, abuse)


def check_chain(chain: Sequence[Interceptor]) -> None:
    """Refuse a chain the server cannot serve safely, with a ConfigError saying why.

    The errors interceptor must come first (it binds the call state that
    everything after reads, and maps errors to statuses), and an interceptor that
    authenticates (``authenticates = True``, like :class:`AuthInterceptor`) must
    follow it: it names the caller whose conversations and quotas a turn uses
    (with ``auth.enabled = false`` the AuthInterceptor names everyone anonymous,
    and the server says so at start).
    """
    if not chain or not isinstance(chain[0], ErrorsInterceptor):
        raise ConfigError(
            "the interceptor chain must start with ErrorsInterceptor(), e.g. "
            "[ErrorsInterceptor(), AuthInterceptor(config.auth, data_dir), ...]"
        )
    if not any(i.authenticates for i in chain[1:]):
        raise ConfigError(
            "the interceptor chain has no interceptor that authenticates: every turn "
            "needs a caller; "
            "use AuthInterceptor(AuthConfig(enabled=False), data_dir) to serve anonymously"
        )
