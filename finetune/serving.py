"""Serving fine-tuned adapters: runtime LoRA loading into vLLM, and model aliases.

vLLM must run with ``--enable-lora`` (``ManagedVLLM.enable_lora: true``, ``max_lora_rank`` at
least the adapter's ``r``) and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (Keel's supervisor
sets it). A loaded adapter is served as its own model name next to the base model, without
a restart. The adapter folder must be readable by the vLLM server process (same machine or
shared storage).

Each adapter *version* is loaded under its own name (``<model>-v<version>``), and Keel's
model alias is pointed at it: promotion and rollback move the alias between loaded names,
so a rollback is instant and in-flight requests on the old version finish normally.

The lead can expose these on ``VLLMBackend`` as thin methods::

    async def load_adapter(self, name: str, path: str) -> None:
        await serving.load_adapter(self.base_url, name, path, api_key=self.api_key)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from app.core.errors import BackendUnavailable, InvalidRequest
from app.core.settings import ModelAlias, server_root  # the LoRA routes live at <root>/v1/...
from app.llm.routing import RoutingTable
from app.llm.vllm_server import server_api_key
from finetune.errors import AdapterServingError

if TYPE_CHECKING:
    from finetune.settings import FinetuneConfig
    from finetune.tracking import AdapterVersion

log = logging.getLogger("keel.finetune.serving")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


#: how long a server may take to accept the connection (loading an adapter itself may take ``timeout``)
CONNECT_TIMEOUT_S = 5.0


async def _post(base_url: str, route: str, body: dict[str, Any], api_key: str | None, timeout: float,
                client: httpx.AsyncClient | None) -> httpx.Response:
    url = f"{server_root(base_url)}/v1/{route}"
    limit = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
    try:
        if client is not None:
            return await client.post(url, json=body, headers=_headers(api_key), timeout=limit)
        async with httpx.AsyncClient(timeout=limit) as own:
            return await own.post(url, json=body, headers=_headers(api_key))
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"cannot reach vLLM at {url}: {type(exc).__name__}: {exc}") from exc


def _error_text(r: httpx.Response) -> str:
    try:
        data = r.json()
        err = data.get("error", data)
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        return r.text[:500]


async def load_adapter(base_url: str, name: str, path: str | Path, *, api_key: str | None = None,
                       replace: bool = False, timeout: float = 120.0, client: httpx.AsyncClient | None = None) -> bool:
    """Load a PEFT adapter folder into a running vLLM server as model ``name``.

    Returns True when loaded, False when ``name`` was already loaded (and ``replace`` is false).
    ``replace`` reloads it in place (vLLM's ``load_inplace``)."""
    body: dict[str, Any] = {"lora_name": name, "lora_path": str(path)}
    if replace:
        body["load_inplace"] = True
    r = await _post(base_url, "load_lora_adapter", body, api_key, timeout, client)
    if r.status_code == 200:
        log.info("vLLM %s: loaded LoRA adapter %r from %s", server_root(base_url), name, path)
        return True
    text = _error_text(r)
    if r.status_code == 400 and "already been loaded" in text:
        return False
    if r.status_code == 404:
        hint = ("vLLM has no runtime LoRA routes: start it with --enable-lora and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" if "Not Found" in text else text)
        raise AdapterServingError(f"cannot load adapter {name!r} from {path}: {hint}")
    raise AdapterServingError(f"vLLM refused to load adapter {name!r} from {path} (HTTP {r.status_code}): {text}")


async def unload_adapter(base_url: str, name: str, *, api_key: str | None = None, timeout: float = 60.0,
                         client: httpx.AsyncClient | None = None) -> bool:
    """Remove adapter ``name`` from the server. Returns False when it was not loaded."""
    r = await _post(base_url, "unload_lora_adapter", {"lora_name": name}, api_key, timeout, client)
    if r.status_code == 200:
        log.info("vLLM %s: unloaded LoRA adapter %r", server_root(base_url), name)
        return True
    if r.status_code == 404 and "cannot be found" in _error_text(r):
        return False
    raise AdapterServingError(f"vLLM refused to unload adapter {name!r} (HTTP {r.status_code}): {_error_text(r)}")


async def served_adapters(base_url: str, *, api_key: str | None = None, timeout: float = 10.0,
                          client: httpx.AsyncClient | None = None) -> dict[str, str]:
    """LoRA model names the server has loaded, mapped to their base model (vLLM's ``parent``)."""
    url = f"{server_root(base_url)}/v1/models"
    try:
        if client is not None:
            r = await client.get(url, headers=_headers(api_key), timeout=timeout)
        else:
            async with httpx.AsyncClient(timeout=timeout) as own:
                r = await own.get(url, headers=_headers(api_key))
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"cannot list models at {url}: {exc}") from exc
    return {m["id"]: m["parent"] for m in r.json().get("data", []) if m.get("parent")}


# -- aliases -------------------------------------------------------------------------------------


def lora_name(version: AdapterVersion) -> str:
    return f"{version.model}-v{version.version}"


def adapter_alias(settings: FinetuneConfig, backend: str, *, adapter_name: str, adapter_path: str | Path,
                  description: str = "", fallback: str | None = None) -> ModelAlias:
    """The alias that routes to an adapter: on vLLM by its served LoRA name, on transformers by path
    (the transformers backend loads the folder with peft on the base model it serves)."""
    spec = settings.backends.get(backend)
    if spec is None:
        raise InvalidRequest(f"unknown backend {backend!r}; configured: {', '.join(settings.backends)}",
                             param="backend")
    if spec.kind == "transformers":
        base = spec.model_path.name if spec.model_path else adapter_name
        return ModelAlias(backend=backend, model=base, adapter=Path(adapter_path), fallback=fallback,
                          description=description)
    if spec.kind == "vllm":
        return ModelAlias(backend=backend, model=adapter_name, fallback=fallback, description=description)
    raise InvalidRequest(f"backend {backend!r} is {spec.kind!r}; adapters are served by vllm or transformers "
                         "backends", param="backend")


def backend_url(settings: FinetuneConfig, backend: str) -> str:
    spec = settings.backends[backend]
    if spec.base_url:
        return spec.base_url
    if spec.managed is None:
        raise InvalidRequest(f"backend {backend!r} has no URL", param="backend")
    return f"http://{spec.managed.host}:{spec.managed.port}/v1"


def backend_urls(settings: FinetuneConfig, backend: str) -> list[str]:
    """Every server of ``backend`` (its URL, then its ``replicas``): an adapter is loaded on each."""
    return [backend_url(settings, backend), *settings.backends[backend].replicas]


def backend_api_key(settings: FinetuneConfig, backend: str, url: str | None = None) -> str | None:
    """The key the backend's server (``url``, default its first) accepts: a server Keel runs has a random one per
    start (known only to the process that started it), a remote one the configured ``api_key``."""
    return server_api_key(settings, url or backend_url(settings, backend))


async def load_everywhere(settings: FinetuneConfig, backend: str, name: str, path: str | Path) -> None:
    """Load adapter ``name`` on every server of ``backend``. A server that cannot be reached is skipped (logged):
    it gets its adapters when it answers again (the replica probe reports it); none reachable, or a refusal, is
    an error."""
    urls = backend_urls(settings, backend)
    outcomes = await asyncio.gather(*(load_adapter(url, name, path, api_key=backend_api_key(settings, backend, url))
                                      for url in urls), return_exceptions=True)
    unreachable = [o for o in outcomes if isinstance(o, BackendUnavailable)]
    refused = next((o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, BackendUnavailable)),
                   None)
    if refused is not None:
        raise refused
    if len(unreachable) == len(urls):
        raise unreachable[0]
    for exc in unreachable:
        log.warning("adapter %s not loaded on a server of %s now (loaded when it answers again): %s", name,
                    backend, exc.message)


async def unload_everywhere(settings: FinetuneConfig, backend: str, name: str) -> None:
    """Unload adapter ``name`` from every server of ``backend`` that answers (failures logged: a loaded adapter
    only costs memory)."""
    for url in backend_urls(settings, backend):
        try:
            await unload_adapter(url, name, api_key=backend_api_key(settings, backend, url))
        except Exception as exc:
            log.warning("could not unload adapter %s from %s at %s: %s", name, backend, url, exc)


@dataclass(frozen=True, slots=True)
class Deployment:
    alias: str
    backend: str
    served_name: str
    adapter_path: str
    seconds: float


async def deploy(settings: FinetuneConfig, version: AdapterVersion, *, alias: str, backend: str,
                 routes: RoutingTable, owner: str, actor: str, fallback: str | None = None) -> Deployment:
    """Make ``version`` answer as model ``alias`` through Keel's chat API.

    vLLM backends: load it at runtime (idempotent per version), then point the alias at it.
    transformers backends: point the alias at the folder (loaded on first request).
    The alias is a route in the routing table (durable, audited, served by every API process within the
    table's check interval); a vLLM server forgets its adapters when it restarts, which
    ``FinetuneService.restore_deployments`` puts back."""
    t0 = time.perf_counter()
    path = version.local_path()
    if not (path / "adapter_config.json").is_file():
        raise AdapterServingError(f"{version.ref}: {path} is not a PEFT adapter folder (no adapter_config.json)")
    name = lora_name(version)
    spec = settings.backends.get(backend)
    if spec is not None and spec.kind == "vllm":
        await load_everywhere(settings, backend, name, path)
    spec = adapter_alias(settings, backend, adapter_name=name, adapter_path=path, fallback=fallback,
                         description=f"LoRA {version.ref} on {backend}")
    await asyncio.to_thread(routes.set, alias, spec, owner=owner, actor=actor, reason=f"deploy {version.ref}")
    return Deployment(alias, backend, name, str(path), time.perf_counter() - t0)
