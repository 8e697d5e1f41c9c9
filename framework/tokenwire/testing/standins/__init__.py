"""Stand-in engine servers: TensorRT-LLM's and SGLang's own gRPC protocols over any engine.

No TensorRT-LLM or SGLang runs here (they need GPUs), so these test doubles
serve the engines' own protocols, generated from their protos in the PyPI
package ``smg-grpc-proto``, over any :class:`~tokenwire.backend.Engine` (tests use
:class:`~tokenwire.testing.FakeBackend`), answering as the real servers do:
their stream shapes, abort, load and status codes. Each module says which
server it stands in for and where that behaviour comes from.

    from tokenwire.testing.standins import running_standin

    async with running_standin("sglang", FakeBackend(reply="hi")) as standin:
        engine = RoutedEngine(RouterConfig(workers=standin.target))

* :mod:`~tokenwire.testing.standins.trtllm`: ``trtllm.TrtllmService``
  (``trtllm-serve --grpc``);
* :mod:`~tokenwire.testing.standins.sglang`: ``sglang.grpc.scheduler.SglangScheduler``
  and ``grpc.health.v1`` (SGLang's gRPC mode);
* :mod:`~tokenwire.testing.standins.server`: :func:`running_standin`.
"""

from tokenwire.testing.standins.common import EngineRunner
from tokenwire.testing.standins.server import (
    STANDIN_PROTOCOLS,
    RunningStandin,
    running_standin,
)
from tokenwire.testing.standins.sglang import SglangHealthStandin, SglangStandin
from tokenwire.testing.standins.trtllm import TrtllmStandin

__all__ = [
    "STANDIN_PROTOCOLS",
    "EngineRunner",
    "RunningStandin",
    "SglangHealthStandin",
    "SglangStandin",
    "TrtllmStandin",
    "running_standin",
]
