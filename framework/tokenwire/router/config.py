"""The ``[router]`` section: the gateway's workers and how turns are spread over them.

Empty ``workers`` (the default) keeps the embedded single-process mode: the
engine of ``[backend]`` runs inside the gateway, with no network hop. Name workers
to route every turn to one of them instead::

    [router]
    workers = "10.0.0.5:50061, 10.0.0.6:50061"          # a static list
    # workers = "dns:///tokenwire-workers.default.svc:50061"  # re-resolved (Kubernetes)
    # workers = "10.0.0.5:50061, trtllm://10.0.0.6:50051, sglang+dns:///sgl.svc:30000"
    policy = "ttft"
    token_file = "/etc/tokenwire/worker-token"

An entry's scheme names the protocol its workers speak (see
:mod:`tokenwire.router.targets`): none or ``vllm://`` for VllmEngine
(``tokenwire worker``, vLLM), ``trtllm://`` for ``trtllm-serve --grpc``,
``sglang://`` for SGLang's gRPC mode; ``+dns`` re-resolves a name.

List-valued settings are comma-separated strings, so they work unchanged as
``TOKENWIRE_ROUTER_*`` environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.auth.config import split_list
from tokenwire.config_fields import require_positive, setting
from tokenwire.errors import ConfigError
from tokenwire.router.fleet import POLICY_NAMES
from tokenwire.router.targets import parse_entry
from tokenwire.worker.config import read_token
from tokenwire.worker.protocol import MAX_MESSAGE_INTERVAL_MS

__all__ = ["RouterConfig"]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Remote engine workers and the load-aware router in front of them."""

    workers: str = setting(
        "",
        "comma-separated workers: HOST:PORT, or dns:///NAME:PORT re-resolved every "
        "dns_refresh_s; a scheme names the protocol they speak: none or vllm:// "
        "(VllmEngine: tokenwire worker, vLLM), trtllm:// (trtllm-serve --grpc), sglang:// "
        "(SGLang's gRPC mode), with +dns to resolve (trtllm+dns:///NAME:PORT); empty: the "
        "[backend] engine runs in-process",
    )
    policy: str = setting(
        "ttft",
        "ttft (least estimated time to first token, conversation affinity while it pays), "
        "round_robin, least_requests or power_of_two",
    )
    token: str = setting("", "shared secret sent to workers as a bearer token")
    token_file: str = setting("", "file holding the shared secret (instead of token)")
    tls_ca_file: str = setting("", "PEM CA the workers' certificates chain to; set: TLS")
    tls_cert_file: str = setting("", "PEM client certificate for mTLS to workers")
    tls_key_file: str = setting("", "PEM private key of tls_cert_file")
    poll_interval_s: float = setting(
        0.05,
        "how often each worker's load is polled (GetLoads) and its health checked; "
        "workers without a load call (TensorRT-LLM) get a health check each time",
    )
    dns_refresh_s: float = setting(5.0, "how often dns:/// workers are resolved again")
    connect_timeout_s: float = setting(
        5.0, "at start, how long to wait for the first worker to answer"
    )
    retries: int = setting(
        2, "other workers a turn tries when its worker fails before the first token"
    )
    eject_after_failures: int = setting(
        3, "consecutive failures (calls or health checks) that take a worker out of rotation"
    )
    eject_s: float = setting(
        2.0, "how long an ejected worker sits out before health checks may bring it back"
    )
    affinity_conversations: int = setting(
        100_000, "conversations whose last worker the router remembers (least recent go first)"
    )
    max_queue_per_slot: float = setting(
        1.0,
        "a worker counts as saturated when waiting requests reach this many per request it "
        "runs at once; with every worker saturated, turns are refused (RESOURCE_EXHAUSTED)",
    )
    message_interval_ms: float = setting(
        5.0,
        "least milliseconds between two messages of one answer from a worker: tokens made "
        "meanwhile ride in the next (the first is never held); an engine slower than this "
        "is not affected, a faster one costs the gateway fewer messages (0: every token "
        "as soon as it is ready)",
    )
    tokenizer_cache_dir: str = setting(
        "~/.cache/tokenwire/tokenizers", "where the tokenizer files workers send are unpacked"
    )
    tokenizer: str = setting(
        "",
        "local directory with the model's tokenizer files (tokenizer.json, and the chat "
        "template in tokenizer_config.json) used instead of the one workers send "
        "(GetTokenizer); set it for workers that send none; empty: ask the workers",
    )
    context_length: int = setting(
        0,
        "the model's context in tokens, for workers that report none (trtllm-serve "
        "started without max_seq_len); 0: what the workers report",
    )
    default_max_running: int = setting(
        0,
        "requests a worker runs at once when it does not say (TensorRT-LLM reports no "
        "load): saturation and the ttft policy count on it; 0: unknown, and such a "
        "worker never counts as saturated",
    )

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ConfigError(
                f"router.policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}"
            )
        require_positive(
            "router", self, "poll_interval_s", "dns_refresh_s", "connect_timeout_s", "eject_s"
        )
        if self.retries < 0 or self.eject_after_failures < 1 or self.affinity_conversations < 0:
            raise ConfigError(
                "router.retries must be >= 0, eject_after_failures >= 1, "
                "affinity_conversations >= 0"
            )
        if not 0 <= self.message_interval_ms <= MAX_MESSAGE_INTERVAL_MS:
            raise ConfigError(
                f"router.message_interval_ms must be within 0..{MAX_MESSAGE_INTERVAL_MS:g}, "
                f"got {self.message_interval_ms}"
            )
        if self.max_queue_per_slot < 0:
            raise ConfigError("router.max_queue_per_slot must be >= 0")
        if self.context_length < 0 or self.default_max_running < 0:
            raise ConfigError("router.context_length and default_max_running must be >= 0")
        for entry in self.worker_list:
            parse_entry(entry)  # an unknown scheme fails here, at start-up

    @property
    def worker_list(self) -> tuple[str, ...]:
        """The configured worker entries."""
        return split_list(self.workers)

    def secret(self) -> str:
        """The shared token for workers; empty: none."""
        return read_token(self.token, self.token_file, "router")
