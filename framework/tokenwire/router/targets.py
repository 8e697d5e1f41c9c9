"""``router.workers`` entries: which engine protocol each worker speaks, and where it is.

Every entry names one worker (or, through DNS, many) and, by its scheme, the
protocol the gateway speaks to it::

    10.0.0.5:50061                       vLLM's VllmEngine (tokenwire worker, vLLM)
    vllm://10.0.0.5:50061                the same, spelled out
    trtllm://10.0.0.6:50051              TensorRT-LLM's TrtllmService (trtllm-serve --grpc)
    sglang://10.0.0.7:30000              SGLang's SglangScheduler (sglang --grpc-mode)
    dns:///workers.default.svc:50061     VllmEngine on every address the name resolves to
    trtllm+dns:///trt.default.svc:50051  TrtllmService on every address, re-resolved

The router keeps one fleet whatever the protocols: a worker's key is its address
for VllmEngine (as before schemes existed) and ``PROTOCOL://ADDRESS`` otherwise.
Pure parsing, no I/O: the config section validates entries with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.errors import ConfigError

__all__ = ["PROTOCOLS", "WorkerEntry", "parse_entry", "split_key", "worker_key"]

PROTOCOLS = ("vllm", "trtllm", "sglang")
_DEFAULT = "vllm"


@dataclass(frozen=True, slots=True)
class WorkerEntry:
    """One ``router.workers`` entry: its protocol, its address (``HOST:PORT``, or
    ``NAME:PORT`` to resolve) and whether DNS resolves it (again and again)."""

    protocol: str
    address: str
    dns: bool = False


def parse_entry(entry: str) -> WorkerEntry:
    """The entry's protocol and address; ConfigError names an unknown scheme."""
    text = entry.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text.startswith("dns:"):  # dns:NAME:PORT, the gRPC name syntax without slashes
            return _checked(entry, WorkerEntry(_DEFAULT, text.removeprefix("dns:"), dns=True))
        return _checked(entry, WorkerEntry(_DEFAULT, text))
    parts = scheme.lower().split("+")
    dns = "dns" in parts
    protocols = [p for p in parts if p != "dns"]
    if len(protocols) > 1 or parts.count("dns") > 1 or any(p not in PROTOCOLS for p in protocols):
        raise ConfigError(
            f"router.workers entry {entry!r}: unknown scheme {scheme!r}; use one of "
            f"{', '.join(f'{p}://' for p in PROTOCOLS)} (no scheme: vllm), with +dns to "
            "resolve a name again and again, e.g. trtllm+dns:///NAME:PORT"
        )
    return _checked(entry, WorkerEntry(protocols[0] if protocols else _DEFAULT, rest, dns=dns))


def _checked(entry: str, parsed: WorkerEntry) -> WorkerEntry:
    address = parsed.address.lstrip("/") if parsed.dns else parsed.address
    if not address:
        raise ConfigError(f"router.workers entry {entry!r} names no address")
    return WorkerEntry(parsed.protocol, address, parsed.dns)


def worker_key(protocol: str, address: str) -> str:
    """The fleet's key for a worker: its address for VllmEngine, else PROTOCOL://ADDRESS."""
    return address if protocol == _DEFAULT else f"{protocol}://{address}"


def split_key(key: str) -> tuple[str, str]:
    """A fleet key's protocol and ``HOST:PORT`` (the inverse of :func:`worker_key`)."""
    scheme, sep, address = key.partition("://")
    return (scheme, address) if sep else (_DEFAULT, key)
