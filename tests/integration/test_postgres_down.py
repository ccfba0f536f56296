"""Postgres going away under a running Keel API process (``database_url``: keys, prompts, evals, lineage, routing,
releases, audit, rate limits), on the session's real vLLM: while it is down, what needs the database answers a
503 that names what is unavailable and never the password, chat keeps answering for a key verified before the
outage, and nothing needs a restart once Postgres is back."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.conftest import KeelServer, eventually, start_api
from tests.integration.test_scale_out import GREET, chat
from tests.postgres import StoppableServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_postgres_down_is_a_503_naming_the_store_and_everything_works_again_when_it_is_back(keel_server: KeelServer,
                                                                                          tmp_path) -> None:
    from app.security.keys import PostgresKeyStore

    pg = StoppableServer()
    api = None
    try:
        url = pg.database()
        bootstrap = PostgresKeyStore(url)
        admin = bootstrap.create("admin", ["admin"])[1]
        bootstrap.close()
        api = start_api(tmp_path / "api", database_url=url, vllm_url=keel_server.vllm_url,
                        vllm_key=keel_server.vllm_api_key)
        api.wait_ready(300)
        as_admin = {"Authorization": f"Bearer {admin}"}
        before = chat(api, admin)
        assert before.status_code == 200, before.text
        made = httpx.post(f"{api.url}/v1/prompts", json={"name": "greet", "content": GREET, "message": "v1"},
                          headers=as_admin, timeout=30)
        assert made.status_code == 201, made.text

        pg.stop()
        # What needs the database: a 503 that names the store and its setting, never the password.
        for method, path, body in (("POST", "/v1/prompts", {"name": "other", "content": GREET, "message": "v1"}),
                                   ("GET", "/v1/admin/keys", None), ("GET", f"/v1/lineage/{before.json()['id']}",
                                                                     None)):
            r = httpx.request(method, f"{api.url}{path}", json=body, headers=as_admin, timeout=60)
            assert r.status_code == 503, (path, r.status_code, r.text)
            message = r.json()["error"]["message"]
            assert "unavailable" in message and "s3cr3t-pw" not in r.text, (path, message)
        unknown = httpx.get(f"{api.url}/v1/models", timeout=60,
                            headers={"Authorization": "Bearer keel-000000000000-never-seen"})
        assert unknown.status_code == 503 and "s3cr3t-pw" not in unknown.text, unknown.text  # not a 401: unknown
        # Serving goes on: a key verified before the outage, a model routed before it.
        during = chat(api, admin)
        assert during.status_code == 200 and during.json()["choices"][0]["message"]["content"], during.text
        assert api.proc.poll() is None

        pg.start()
        # Back without a restart: writes, reads, the prompt made before the outage, new keys.
        back = time.monotonic()
        again = eventually(lambda: (r := httpx.post(f"{api.url}/v1/prompts", headers=as_admin, timeout=30, json={
            "name": "other", "content": GREET, "message": "v1"})).status_code == 201 and r, timeout=30)
        assert again, "the prompt registry did not come back within 30 s"
        print(f"prompt registry back {time.monotonic() - back:.1f} s after Postgres")
        served = eventually(lambda: (r := chat(api, admin, prompt={"ref": "greet@1", "variables": {"who": "Ada"}}))
                            .status_code == 200 and r, timeout=30)
        assert served and served.json()["prompt"]["ref"] == "greet@1"
        key = httpx.post(f"{api.url}/v1/admin/keys", json={"name": "after", "scopes": ["chat"]}, headers=as_admin,
                         timeout=30)
        assert key.status_code == 201, key.text
        assert chat(api, key.json()["key"]).status_code == 200
        lineage = eventually(lambda: (r := httpx.get(f"{api.url}/v1/lineage/{served.json()['id']}", headers=as_admin,
                                                     timeout=30)).status_code == 200 and r, timeout=30)
        assert lineage and lineage.json()["prompt"]["ref"] == "greet@1"
    finally:
        if api is not None:
            api.stop()
        pg.start()
        pg.close()
