"""GET /v1/models and /v1/models/{model_id}: the served model's card."""

from __future__ import annotations

from server.errors import NotFound, clip


class Models:
    def __init__(self, state):
        self.state = state

    async def on_get(self, req, resp) -> None:
        resp.media = {"object": "list", "data": [model_card(self.state.model)]}

    async def on_get_model(self, req, resp, model_id: str) -> None:
        if model_id != self.state.model.name:
            raise NotFound(f"The model '{clip(model_id)}' does not exist.", param="model", code="model_not_found")
        resp.media = model_card(self.state.model)


def model_card(model) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "dfastllm",
            "root": model.name, "max_model_len": model.max_model_len}
