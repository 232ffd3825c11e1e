"""schemathesis against the live API's OpenAPI schema.

No input, valid or not, gets a 5xx, and the server answers after.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from medvlm.serve.api import ApiConfig, create_app, load_engine
from medvlm.serve.batching import BatcherConfig
from medvlm.serve.images import ImageLimits
from medvlm.serve.server import BackgroundServer
from serve_helpers import tiny_checkpoint

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    engine = load_engine(str(tiny_checkpoint(tmp_path_factory)))
    # small generation budget so each fuzzed request is quick
    config = ApiConfig(
        model_name="tiny-med",
        api_key=KEY,
        default_max_tokens=4,
        context_length=400,
        limits=ImageLimits(max_bytes=100_000, max_pixels=500_000),
        batcher=BatcherConfig(max_batch=4, max_wait_ms=2),
    )
    with BackgroundServer(create_app(engine, config)) as srv:
        yield srv


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(live_api, mode: GenerationMode) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(live_api.url + "/openapi.json", headers=headers)  # the key guards it too
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/v1/models", "/v1/chat/completions"}
    statuses: list[int] = []
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # GET /v1/models takes no input: nothing to make invalid

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=50 if op.method.upper() == "POST" else 5,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:
            response = case.call_and_validate(base_url=live_api.url, headers=headers, checks=[not_a_server_error])
            statuses.append(response.status_code)

        run()
    assert statuses and all(s < 500 for s in statuses)
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses  # valid requests were answered, not only refused
    # the same server, right after this fuzzing (in this test, so it holds when the test runs alone): still answers
    r = httpx.post(
        live_api.url + "/v1/chat/completions",
        headers=headers,
        json={"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
