"""The LLM client layer against a real OpenAI-compatible HTTP server, through the official openai client."""

from __future__ import annotations

import email.utils
import json
import sqlite3
import time
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from medvlm.errors import MedvlmError
from medvlm.llm import (
    LLMClient,
    LLMConfig,
    LLMFatalError,
    LLMRequest,
    llm_options,
    lookup_price,
    retry_after_seconds,
)
from openai_test_server import Fault, openai_server_factory  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("MEDVLM_TEST_KEY", "sk-test")


def _cfg(server, tmp_path: Path | None = None, **kw) -> LLMConfig:
    base = dict(
        model="gpt-4o",
        base_url=server.base_url,
        api_key_env="MEDVLM_TEST_KEY",
        retries=3,
        backoff_base=0.01,
        timeout=5.0,
        concurrency=3,
        progress=False,
        cache_path=(tmp_path / "cache.sqlite") if tmp_path else None,
    )
    base.update(kw)
    return LLMConfig(**base)


def _msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": text}]


def test_429_retry_after_is_honoured(openai_server_factory):
    server = openai_server_factory(faults_by_key={"a": [Fault("status", 429, retry_after="1")]})
    with LLMClient(_cfg(server)) as client:
        res = client.complete(_msgs("a"))
    assert res.ok and res.attempts == 2
    first, second = server.requests_for("a")
    assert first.outcome == "status:429" and second.outcome == "ok"
    assert second.time - first.time >= 0.95  # waited for Retry-After, not the 10 ms backoff
    assert client.usage.retries["HTTP 429"] == 1


def test_each_fault_kind_is_retried_and_the_batch_completes(openai_server_factory):
    faults = {
        "500": [Fault("status", 500)],
        "503": [Fault("status", 503)],
        "timeout": [Fault("timeout", delay=1.0)],
        "malformed": [Fault("malformed")],
        "empty": [Fault("empty")],
        "429ms": [Fault("status", 429, retry_after_ms="20")],
    }
    server = openai_server_factory(lambda body: f"reply to {body['messages'][-1]['content']}", faults_by_key=faults)
    keys = [*faults, "clean1", "clean2"]
    seen = []
    with LLMClient(_cfg(server, timeout=0.4)) as client:
        results = client.complete_many(
            [LLMRequest(_msgs(k), tag=k) for k in keys], on_result=lambda r: seen.append(r.tag)
        )
    assert [r.tag for r in results] == keys  # returned in request order
    assert sorted(seen) == sorted(keys)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.text for r in results] == [f"reply to {k}" for k in keys]
    for k in faults:
        assert [r.outcome for r in server.requests_for(k)][-1] == "ok" and len(server.requests_for(k)) == 2, k
    assert client.usage.completed == len(keys) and client.usage.failed == 0
    assert set(client.usage.retries) == {
        "HTTP 500",
        "HTTP 503",
        "timeout",
        "malformed reply",
        "empty reply",
        "HTTP 429",
    }


def test_a_request_that_keeps_failing_fails_alone(openai_server_factory):
    server = openai_server_factory(
        faults_by_key={"bad": [Fault("status", 502, repeat=True)], "invalid": [Fault("status", 400)]}
    )
    with LLMClient(_cfg(server, retries=2)) as client:
        results = client.complete_many([LLMRequest(_msgs(k), tag=k) for k in ("ok1", "bad", "invalid", "ok2")])
    by = {r.tag: r for r in results}
    assert by["ok1"].ok and by["ok2"].ok
    assert not by["bad"].ok and by["bad"].attempts == 3 and "HTTP 502" in by["bad"].error
    assert len(server.requests_for("bad")) == 3
    assert not by["invalid"].ok and "HTTP 400" in by["invalid"].error
    assert len(server.requests_for("invalid")) == 1  # a client error is not retried
    assert client.usage.failed == 2


def test_concurrency_is_bounded(openai_server_factory):
    slow = Fault("timeout", delay=0.2, repeat=True)  # every reply takes 0.2 s (well within the client timeout)
    server = openai_server_factory(faults_by_key={f"q{i}": [slow] for i in range(6)})
    with LLMClient(_cfg(server, concurrency=2)) as client:
        assert all(r.ok for r in client.complete_many([LLMRequest(_msgs(f"q{i}")) for i in range(6)]))
    assert server.max_in_flight == 2


def test_backoff_is_exponential_with_jitter(openai_server_factory):
    server = openai_server_factory(faults_by_key={"x": [Fault("status", 500)] * 3})
    delays: list[float] = []
    with LLMClient(_cfg(server, backoff_base=0.1, backoff_max=0.3), sleep=delays.append) as client:
        assert client.complete(_msgs("x")).ok
    assert len(delays) == 3
    for d, cap in zip(delays, (0.1, 0.2, 0.3)):
        assert cap / 2 <= d <= cap


def test_auth_error_stops_the_batch(openai_server_factory):
    server = openai_server_factory(faults_by_index={0: Fault("status", 401)})
    delivered = []
    with LLMClient(_cfg(server, concurrency=1)) as client:
        with pytest.raises(LLMFatalError, match="HTTP 401"):
            client.complete_many([LLMRequest(_msgs(str(i)), tag=i) for i in range(20)], on_result=delivered.append)
        assert len(server.requests) < 20  # it did not keep sending hopeless requests
        assert client.complete(_msgs("after")).ok  # the client is usable again afterwards
    assert delivered[0].fatal


def test_connection_errors_are_retried_then_reported(tmp_path):
    cfg = LLMConfig(
        model="m",
        base_url="http://127.0.0.1:9/v1",
        api_key_env="",
        retries=2,
        backoff_base=0.01,
        timeout=2.0,
        progress=False,
    )
    with LLMClient(cfg) as client:
        res = client.complete(_msgs("q"))
    assert not res.ok and res.attempts == 3 and "connection error" in res.error


def test_cache_makes_a_rerun_free_and_keys_on_the_full_request(openai_server_factory, tmp_path):
    server = openai_server_factory()
    reqs = [LLMRequest(_msgs(f"q{i}")) for i in range(5)]
    with LLMClient(_cfg(server, tmp_path)) as client:
        first = client.complete_many(reqs)
    assert len(server.requests) == 5
    with LLMClient(_cfg(server, tmp_path)) as client:
        again = client.complete_many(reqs)
        assert len(server.requests) == 5  # zero new requests
        assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)
        assert client.usage.cached == 5 and client.usage.http_requests == 0
        assert client.complete(_msgs("q0"), {"temperature": 0.7}).cached is False  # another request: another key
    with LLMClient(_cfg(server, tmp_path, model="gpt-4o-mini")) as client:
        assert client.complete(_msgs("q0")).cached is False  # another model: another key
    assert len(server.requests) == 7


def test_failed_replies_are_not_cached(openai_server_factory, tmp_path):
    server = openai_server_factory(faults_by_key={"q": [Fault("empty")]})
    with LLMClient(_cfg(server, tmp_path, retries=0)) as client:
        assert not client.complete(_msgs("q")).ok
    with LLMClient(_cfg(server, tmp_path, retries=0)) as client:
        assert client.complete(_msgs("q")).ok
    assert len(server.requests) == 2


def test_list_content_with_data_url_images_is_sent_as_given(openai_server_factory, tmp_path):
    server = openai_server_factory()
    url = "data:image/png;base64," + "A" * 4000
    content = [{"type": "text", "text": "Which answer is better?"}, {"type": "image_url", "image_url": {"url": url}}]
    with LLMClient(_cfg(server, tmp_path)) as client:
        assert client.complete([{"role": "user", "content": content}]).ok
    assert server.requests[0].body["messages"][0]["content"] == content
    stored = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT request FROM responses").fetchone()[0]
    assert "AAAA" not in stored and "sha256=" in stored  # the cache keeps a digest, not the image


def test_usage_and_cost_summary(openai_server_factory, tmp_path):
    server = openai_server_factory(lambda body: "one two three four", prompt_tokens=1000)
    with LLMClient(_cfg(server, tmp_path)) as client:
        client.complete_many([LLMRequest(_msgs(f"q{i}")) for i in range(4)])
    assert (client.usage.prompt_tokens, client.usage.completion_tokens) == (4000, 16)
    # gpt-4o: $2.50 / $10 per 1M tokens -> 4000 * 2.5e-6 + 16 * 1e-5 = 0.01016
    assert "cost: $0.0102" in client.usage.summary(client.config)
    with LLMClient(_cfg(server, tmp_path)) as client:
        client.complete_many([LLMRequest(_msgs(f"q{i}")) for i in range(4)])
    assert "saved by cache: $0.0102" in client.usage.summary(client.config)
    unknown = _cfg(server, model="my-local-llama")
    assert "cost: unknown" in client.usage.summary(unknown)
    assert "cost: $0.0000" not in client.usage.summary(unknown)
    custom = _cfg(server, model="my-local-llama", price_input=1.0, price_output=2.0)
    assert "saved by cache: $0.0040" in client.usage.summary(custom)  # 4000 * 1e-6 + 16 * 2e-6


def test_azure_client_uses_the_deployment_route(openai_server_factory, monkeypatch):
    server = openai_server_factory()
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-key")
    cfg = LLMConfig(model="gpt-4", azure_endpoint=server.azure_endpoint, azure_deployment="my-gpt4", progress=False)
    with LLMClient(cfg) as client:
        assert client.complete(_msgs("hello")).ok
    req = server.requests[0]
    assert req.path == "/openai/deployments/my-gpt4/chat/completions"
    assert req.headers.get("api-key") == "az-key"


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MEDVLM_TEST_KEY", raising=False)
    with pytest.raises(MedvlmError, match="MEDVLM_TEST_KEY"):
        LLMClient(LLMConfig(api_key_env="MEDVLM_TEST_KEY"))
    with pytest.raises(MedvlmError, match="concurrency"):
        LLMClient(LLMConfig(api_key_env="", concurrency=0))


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds({"retry-after": date}) <= 31
    assert retry_after_seconds({}) is None


def test_price_lookup():
    assert lookup_price("gpt-4o-2024-08-06") == lookup_price("gpt-4o")
    assert lookup_price("gpt-4o-mini") == (0.15, 0.60)
    assert lookup_price("gpt-4.1-nano") == (0.10, 0.40)  # not priced as gpt-4
    assert lookup_price("llama3:8b") is None


def test_shared_typer_options_build_the_config():
    app = typer.Typer()
    got = {}

    @app.command()
    @llm_options(model="judge-model", concurrency=2)
    def judge(answers: Annotated[str, typer.Option("--answers")], *, llm: LLMConfig) -> None:
        got["answers"], got["llm"] = answers, llm

    res = CliRunner().invoke(
        app,
        [
            "--answers",
            "a.jsonl",
            "--base-url",
            "http://x/v1",
            "--temperature",
            "0.3",
            "--cache",
            "c.sqlite",
            "--no-progress",
            "--max-tokens-field",
            "max_completion_tokens",
        ],
    )
    assert res.exit_code == 0, res.output
    llm = got["llm"]
    assert got["answers"] == "a.jsonl"
    assert (llm.model, llm.concurrency, llm.base_url, llm.temperature, llm.cache_path, llm.progress) == (
        "judge-model",
        2,
        "http://x/v1",
        0.3,
        Path("c.sqlite"),
        False,
    )
    assert llm.max_tokens_field == "max_completion_tokens"
    assert json.dumps(llm.extra_params) == "{}"
    # the LLM's name is --llm-model: --model means a medvlm checkpoint everywhere in the CLI
    assert CliRunner().invoke(app, ["--answers", "a", "--llm-model", "other"]).exit_code == 0
    assert got["llm"].model == "other"
    assert CliRunner().invoke(app, ["--answers", "a", "--model", "other"]).exit_code == 2


def test_request_body_fields(openai_server_factory):
    server = openai_server_factory()
    cfg = _cfg(server, max_tokens=77, max_tokens_field="max_completion_tokens", seed=5, extra_params={"top_p": 0.5})
    with LLMClient(cfg) as client:
        assert client.complete(_msgs("q"), {"temperature": 0.2}).ok
    body = server.requests[0].body
    assert (body["model"], body["max_completion_tokens"], body["seed"], body["top_p"], body["temperature"]) == (
        "gpt-4o",
        77,
        5,
        0.5,
        0.2,
    )
    assert "max_tokens" not in body
    with pytest.raises(MedvlmError, match="max_tokens_field"):
        LLMClient(_cfg(server, max_tokens_field="tokens"))
