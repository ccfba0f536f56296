"""Supervisor behaviour against a fake server process (the real vLLM runs in tests/integration)."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.core.errors import KeelError
from app.core.settings import ManagedVLLM
from app.llm.model_prep import SMOLLM2_TOOLS_TEMPLATE
from app.llm.vllm_server import VLLMSupervisor, port_in_use

FAKE = Path(__file__).parents[1] / "fakes" / "fake_vllm.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def make(tmp_path: Path):
    """A supervisor whose 'python' runs the fake server script."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    counter = tmp_path / "starts"
    made = []

    def _make(mode: str = "ok", **cfg) -> VLLMSupervisor:
        # The server gets a scrubbed environment, so the fake's settings travel in its launcher.
        launcher = tmp_path / f"python-{len(made)}"
        launcher.write_text(f"#!/bin/sh\nFAKE_VLLM_MODE={mode} FAKE_VLLM_COUNTER={counter} "
                            f"exec {sys.executable} {FAKE} \"$@\"\n")
        launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
        config = ManagedVLLM(python=launcher, port=free_port(), model_path=model, restart_backoff_s=0.05, **cfg)
        sup = VLLMSupervisor("t", config, tmp_path / "vllm.log", liveness_interval_s=0.3, liveness_failures=2)
        sup.starts = lambda: counter.read_text().count("start") if counter.exists() else 0
        made.append(sup)
        return sup

    yield _make
    for sup in made:  # no fake server outlives its test
        await sup.stop()


async def test_starts_becomes_ready_and_stops(make) -> None:
    sup = make()
    await sup.start()
    assert await sup.wait_ready(20)
    assert sup.state == "ready" and port_in_use("127.0.0.1", sup.cfg.port)
    assert any("fake vllm starting" in line for line in sup.tail())
    await sup.stop()
    assert sup.state == "stopped" and not port_in_use("127.0.0.1", sup.cfg.port)


async def test_a_killed_server_is_restarted(make) -> None:
    restarted = []
    sup = make()
    sup.on_restart = lambda: restarted.append(1)
    await sup.start()
    assert await sup.wait_ready(20)
    first_pid = sup.pid
    sup.kill()
    for _ in range(200):
        await asyncio.sleep(0.05)
        if sup.state == "ready" and sup.pid != first_pid:
            break
    assert sup.state == "ready" and sup.pid != first_pid
    assert sup.restarts == 1 and restarted == [1]
    await sup.stop()


async def test_a_restarted_server_is_announced_once_it_is_ready_again(make) -> None:
    """What was loaded into the server at run time (LoRA adapters) is gone after a restart: its owner is told."""
    ready_again: list[tuple[int | None, str]] = []
    sup = make()

    async def reload() -> None:
        ready_again.append((sup.pid, sup.state))

    sup.on_ready_again.append(reload)
    await sup.start()
    assert await sup.wait_ready(20)
    await asyncio.sleep(0.2)
    assert ready_again == []  # the first start: nothing was lost
    first_pid = sup.pid
    sup.kill()
    for _ in range(200):
        await asyncio.sleep(0.05)
        if ready_again:
            break
    assert ready_again == [(sup.pid, "ready")] and sup.pid != first_pid
    await sup.stop()


async def test_the_restart_budget_is_per_window_not_for_life(make) -> None:
    sup = make("crash", max_restarts=2, restart_window_s=0.3)  # crashes spread over time: restarted every time
    sup.cfg.restart_backoff_s = 0.2
    await sup.start()
    for _ in range(300):
        await asyncio.sleep(0.05)
        if sup.restarts >= 4 or sup.state == "failed":
            break
    assert sup.restarts >= 4 and sup.state != "failed"
    await sup.stop()


async def test_a_hung_server_is_killed_and_restarted(make) -> None:
    sup = make("hang")
    await sup.start()
    assert await sup.wait_ready(20)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if sup.restarts >= 1:
            break
    assert sup.restarts >= 1 and "stopped answering /health" in (sup.last_error or "")
    await sup.stop()


async def test_a_crash_loop_gives_up_after_max_restarts(make) -> None:
    sup = make("crash", max_restarts=2)
    await sup.start()
    for _ in range(200):
        await asyncio.sleep(0.05)
        if sup.state == "failed":
            break
    assert sup.state == "failed" and sup.restarts == 2 and sup.starts() == 3
    assert "code 3" in sup.last_error and str(sup.log_path) in sup.last_error
    assert not await sup.wait_ready(0.1)
    await sup.stop()


def test_preflight_says_what_to_fix(make, tmp_path: Path) -> None:
    sup = make()
    sup.cfg.python = tmp_path / "missing-python"
    with pytest.raises(KeelError, match="make setup") as exc:
        sup.preflight()
    assert exc.value.code == "vllm_not_installed"

    sup = make()
    sup.cfg.model_path = tmp_path / "no-model"
    with pytest.raises(KeelError, match="keel model prepare"):
        sup.preflight()

    sup = make()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", sup.cfg.port))
        busy.listen()
        with pytest.raises(KeelError, match="already in use") as exc:
            sup.preflight()
    assert exc.value.code == "port_in_use"


def test_command_line_carries_the_settings(make) -> None:
    sup = make(enforce_eager=True, enable_lora=True, lora_modules={"support": Path("/a")}, extra_args=["--seed", "1"])
    cmd = sup.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in cmd and "--enable-lora" in cmd and "support=/a" in cmd
    assert cmd[-2:] == ["--seed", "1"]
    env = sup.environment()
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "VIRTUAL_ENV" not in env and "PYTHONPATH" not in env  # vLLM's venv, not ours


def test_environment_is_an_allow_list_without_secrets(make, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KEEL_AUTH__ENABLED": "true", "KEEL_EVALS__JUDGE_API_KEY": "sk-judge",
                        "OPENAI_API_KEY": "sk-1", "DATABASE_URL": "postgres://u:pw@db/keel",
                        "AWS_SECRET_ACCESS_KEY": "x", "HF_TOKEN": "hf_x", "VLLM_API_KEY": "inherited",
                        "PGPASSWORD": "pw", "RANDOM_THING": "1", "VIRTUAL_ENV": "/keel/.venv", "PYTHONPATH": "/keel",
                        "HF_HOME": "/cache/hf", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "2",
                        "CUDA_VISIBLE_DEVICES": "0", "TORCH_HOME": "/cache/torch", "TMPDIR": "/tmp/k",
                        "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}.items():
        monkeypatch.setenv(name, value)
    sup = make()
    env = sup.environment()
    for kept in ("PATH", "HF_HOME", "LC_ALL", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TORCH_HOME", "TMPDIR",
                 "VLLM_CPU_OMP_THREADS_BIND"):
        assert kept in env, kept
    for dropped in ("KEEL_AUTH__ENABLED", "KEEL_EVALS__JUDGE_API_KEY", "OPENAI_API_KEY", "DATABASE_URL",
                    "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "VLLM_API_KEY", "PGPASSWORD", "RANDOM_THING", "VIRTUAL_ENV",
                    "PYTHONPATH"):
        assert dropped not in env, dropped
    assert not any(v in ("sk-1", "sk-judge", "hf_x", "inherited") or "pw@" in v for v in env.values())
    # what the operator names in managed.env is passed on (a variable outside the allow list, on purpose)
    chosen = make(env={"RANDOM_THING": "2", "HF_TOKEN": "hf_mine"}).environment()
    assert chosen["RANDOM_THING"] == "2" and chosen["HF_TOKEN"] == "hf_mine"


async def test_each_start_gets_a_random_key_that_the_server_requires(make) -> None:
    import httpx

    from app.llm.vllm_server import managed_api_key

    sup = make()
    assert sup.api_key is None and "VLLM_API_KEY" not in sup.environment()
    await sup.start()
    key = sup.api_key
    assert key and len(key) >= 32 and managed_api_key(f"{sup.base_url}/v1") == key
    assert sup.environment()["VLLM_API_KEY"] == key
    # The key is in the child's environment, not on its command line (readable by any local user), in the
    # admin status or in the log.
    assert all(key not in part for part in sup.command()) and key not in str(sup.status())
    assert await sup.wait_ready(20)  # the readiness poll of /v1/models sends it
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{sup.base_url}/v1/models")).status_code == 401
        assert (await c.get(f"{sup.base_url}/v1/models", headers=sup.auth_headers())).status_code == 200
        assert (await c.get(f"{sup.base_url}/health")).status_code == 200
    assert key not in sup.log_path.read_text()
    await sup.stop()
    assert managed_api_key(sup.base_url) is None
    await sup.start()
    assert sup.api_key != key
    await sup.stop()


async def test_a_configured_key_replaces_the_random_one(make) -> None:
    """Other processes (a fine-tune worker's judge, the integration tests) reach the server with a key they know."""
    sup = make()
    sup.fixed_key = "k" * 40
    await sup.start()
    assert sup.api_key == "k" * 40 and sup.environment()["VLLM_API_KEY"] == "k" * 40
    await sup.stop()


def test_function_calling_is_configured_for_the_prepared_smollm2(make) -> None:
    sup = make()
    cmd = sup.command()
    assert cmd[cmd.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in cmd
    assert cmd[cmd.index("--tool-strict-level") + 1] == "parameter"
    assert "--chat-template" not in cmd  # not Keel's prepared folder: the model's own template
    (sup.cfg.model_path / "keel-prepared.json").write_text("{}")
    cmd = sup.command()
    assert cmd[cmd.index("--chat-template") + 1] == str(SMOLLM2_TOOLS_TEMPLATE)
    cmd = make(tool_call_parser=None, chat_template=Path("/t.jinja")).command()
    assert "--tool-call-parser" not in cmd and cmd[cmd.index("--chat-template") + 1] == "/t.jinja"


def test_the_tools_template_renders_smollm2s_own_prompt_when_there_are_no_tools() -> None:
    """Plain chat must not change because the server can call functions now."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    own = env.from_string(
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    ours = env.from_string(SMOLLM2_TOOLS_TEMPLATE.read_text())
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "a\nb"}]):
        for gen in (True, False):
            assert ours.render(messages=messages, add_generation_prompt=gen) == own.render(
                messages=messages, add_generation_prompt=gen)
    called = ours.render(add_generation_prompt=True, tools=[{"type": "function", "function": {"name": "weather"}}],
                         messages=[{"role": "user", "content": "Weather in Paris?"},
                                   {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {
                                       "name": "weather", "arguments": '{"city": "Paris"}'}}]},
                                   {"role": "tool", "tool_call_id": "c1", "content": "21 C"}])
    # (jinja's own tojson sorts keys; vLLM's keeps them in order)
    assert '<tools>\n{"function": {"name": "weather"}, "type": "function"}\n</tools>' in called
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in called
    assert called.endswith("<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
