"""The OpenAPI document tells what the server does: the error statuses every route shares are documented with
Keel's error body (400 for a bad request, not FastAPI's 422; 401/429 behind a key; 403 behind a scope), and what
a route answers without a key or with a malformed path is among its documented statuses."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.api.main import create_app
from app.container import Container
from app.settings import Settings

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory):
    home: Path = tmp_path_factory.mktemp("openapi")
    container = await Container.build(Settings(home=home, guardrails={"enabled": False}), start_backends=False)
    yield create_app(container=container)
    await container.aclose()


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, op in item.items():
            yield path, method, op


async def test_every_operation_documents_the_errors_it_shares_with_keels_error_body(app) -> None:
    schema = app.openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, method, op in operations(schema):
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                assert response["content"]["application/json"]["schema"] == ERROR, (method, path, status)
        if path.startswith("/v1/"):
            assert {"401", "429"} <= set(responses), (method, path)
            if op.get("parameters") or op.get("requestBody"):
                assert "400" in responses, (method, path)
    pipelines = schema["paths"]["/v1/pipelines/{name}/runs"]["post"]["responses"]
    assert {"201", "400", "401", "403", "404", "409", "429", "503"} <= set(pipelines)


async def test_what_a_route_answers_without_a_key_is_documented(app) -> None:
    schema = app.openapi()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as c:
        for path, method, op in operations(schema):
            if not path.startswith("/v1/"):
                continue
            url = path.replace("{", "").replace("}", "")  # a placeholder value for each path parameter
            r = await c.request(method.upper(), url, headers={"Authorization": "Bearer keel-not-a-key"})
            assert r.status_code == 401, (method, path, r.status_code)
            assert str(r.status_code) in op["responses"] and r.json()["error"]["code"], (method, path)
