"""Engine clients for remote workers, one per engine protocol, chosen by a worker's key.

Each is an :class:`~tokenwire.backend.Engine` over a worker's own gRPC protocol
(their protos ship in the PyPI package ``smg-grpc-proto``), built on the shared
:class:`~tokenwire.router.client.EngineClient`:

* ``vllm`` (:class:`~tokenwire.router.vllm.VllmClient`, also ``RemoteEngine``):
  ``vllm.grpc.engine.VllmEngine``, served by ``tokenwire worker`` and vLLM;
* ``trtllm`` (:class:`~tokenwire.router.trtllm.TrtllmClient`):
  ``trtllm.TrtllmService``, served by ``trtllm-serve --grpc``;
* ``sglang`` (:class:`~tokenwire.router.sglang.SglangClient`):
  ``sglang.grpc.scheduler.SglangScheduler``, SGLang's gRPC mode.

    engine = client_for("trtllm://10.0.0.6:50051", token="s3cret")
    await engine.start()          # model info, and the tokenizer the worker sends
"""

from __future__ import annotations

from typing import Any

from tokenwire.router.client import EngineClient
from tokenwire.router.sglang import SglangClient
from tokenwire.router.targets import split_key
from tokenwire.router.trtllm import TrtllmClient
from tokenwire.router.vllm import VllmClient

__all__ = ["CLIENTS", "RemoteEngine", "client_for"]

CLIENTS: dict[str, type[EngineClient]] = {
    "vllm": VllmClient,
    "trtllm": TrtllmClient,
    "sglang": SglangClient,
}
RemoteEngine = VllmClient  # the VllmEngine client, under the name it has always had


def client_for(key: str, **options: Any) -> EngineClient:
    """The engine client for a fleet key (``HOST:PORT`` or ``PROTOCOL://HOST:PORT``);
    ``options`` go to :class:`~tokenwire.router.client.EngineClient`."""
    protocol, address = split_key(key)
    return CLIENTS[protocol](address, **options)
