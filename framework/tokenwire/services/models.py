"""``tokenwire.v1.ModelService``: the served models, the default first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from tokenwire.model.frontend import ChatModel
from tokenwire.proto.v1 import models_pb2, models_pb2_grpc

__all__ = ["ModelServicer"]


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Lists the served models, the default first."""

    def __init__(self, models: Mapping[str, ChatModel], backend_name: str) -> None:
        self._models = models
        self._backend_name = backend_name

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(
            models=[
                models_pb2.Model(
                    name=name,
                    backend=self._backend_name,
                    context_length=model.context_length,
                    is_default=index == 0,
                )
                for index, (name, model) in enumerate(self._models.items())
            ]
        )
