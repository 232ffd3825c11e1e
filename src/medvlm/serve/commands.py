"""``medvlm serve``: OpenAI-compatible API, LLaVA controller / worker / test client, and the web UI."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from medvlm.errors import MedvlmError
from medvlm.notice import SHORT_NOTICE

app = typer.Typer(help=f"Serve a medvlm model: OpenAI-compatible API, LLaVA controller/workers, web UI. {SHORT_NOTICE}",
                  no_args_is_help=True)


def _api_key(env: str | None) -> str | None:
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise MedvlmError(f"--api-key-env {env}: the environment variable is not set or empty")
    return key


def _limits(max_image_mb: float, max_image_pixels: int, allow_remote: bool = False, remote_timeout: float = 10.0):
    from medvlm.serve.images import ImageLimits

    if max_image_mb <= 0 or max_image_pixels <= 0:
        raise MedvlmError("--max-image-mb and --max-image-pixels must be > 0")
    return ImageLimits(max_bytes=int(max_image_mb * 1024 * 1024), max_pixels=max_image_pixels,
                       allow_remote=allow_remote, remote_timeout_s=remote_timeout)


def _mib(mb: float) -> int:
    if mb < 0:
        raise MedvlmError(f"--prefix-cache-mb must be >= 0 (got {mb})")
    return int(mb * 1024 * 1024)


@app.command("api")
def api(
    model: Path = typer.Option(..., "--model", help="A medvlm checkpoint folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Environment variable holding the required API key."),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="Model name for clients (default: folder name)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests decoded together (1 = one at a time)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="When idle, how long a first request waits for others to prefill with."),
    prefix_cache_mb: float = typer.Option(1024.0, "--prefix-cache-mb", help="Prefix KV-cache budget in MiB (0 = off)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests in flight before 503."),
    max_image_mb: float = typer.Option(20.0, "--max-image-mb", help="Largest image (MiB)."),
    max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels", help="Largest image in pixels."),
    max_images: int = typer.Option(4, "--max-images", help="Most images per request."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs."),
    remote_timeout: float = typer.Option(10.0, "--remote-timeout", help="Seconds allowed per remote image."),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Log message text (never images)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16."),
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions API (research use only)."""
    from medvlm.serve.api import ApiConfig, load_engine, run_api
    from medvlm.serve.batching import BatcherConfig

    config = ApiConfig(model_name=served_model_name or model.resolve().name, api_key=_api_key(api_key_env),
                       batcher=BatcherConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue),
                       limits=_limits(max_image_mb, max_image_pixels, allow_remote_images, remote_timeout),
                       max_images=max_images, log_prompts=log_prompts)
    run_api(load_engine(str(model), dtype=dtype, batch_size=max_batch, prefix_cache_bytes=_mib(prefix_cache_mb)), config,
            host=host, port=port)


@app.command("controller")
def controller(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(21001, "--port"),
    dispatch: str = typer.Option("shortest_queue", "--dispatch", help="shortest_queue | lottery."),
    heart_beat_expiration: float = typer.Option(30.0, "--heart-beat-expiration", help="Drop workers silent this long (s)."),
) -> None:
    """LLaVA's controller: workers register here, clients ask it where to send requests."""
    import uvicorn

    from medvlm.serve.controller import ControllerConfig, create_controller_app

    app_ = create_controller_app(ControllerConfig(dispatch=dispatch, heart_beat_expiration=heart_beat_expiration))
    typer.echo(f"medvlm controller on http://{host}:{port} ({dispatch}). {SHORT_NOTICE}")
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command("worker")
def worker(
    controller_url: str = typer.Option(..., "--controller", help="Controller URL, e.g. http://127.0.0.1:21001."),
    model: Path = typer.Option(..., "--model", help="A medvlm checkpoint folder."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(21002, "--port"),
    worker_address: str | None = typer.Option(None, "--worker-address", help="Address the controller calls (default http://HOST:PORT)."),
    model_name: str | None = typer.Option(None, "--model-name", help="Name to serve under (default: folder name)."),
    limit_concurrency: int = typer.Option(5, "--limit-concurrency", help="Requests in flight."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests decoded together."),
    prefix_cache_mb: float = typer.Option(1024.0, "--prefix-cache-mb", help="Prefix KV-cache budget in MiB (0 = off)."),
    heart_beat_interval: float = typer.Option(15.0, "--heart-beat-interval", help="Seconds between heart beats."),
    no_register: bool = typer.Option(False, "--no-register", help="Do not register with the controller."),
    max_image_mb: float = typer.Option(20.0, "--max-image-mb"),
    max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels"),
    dtype: str | None = typer.Option(None, "--dtype"),
) -> None:
    """LLaVA's model worker: serves one model to a controller."""
    import uvicorn

    from medvlm.serve.api import load_engine
    from medvlm.serve.batching import BatcherConfig
    from medvlm.serve.worker import WorkerConfig, create_worker_app

    config = WorkerConfig(controller_url=controller_url.rstrip("/"), worker_url=worker_address or f"http://{host}:{port}",
                          model_name=model_name or model.resolve().name, register=not no_register,
                          heart_beat_interval=heart_beat_interval, limit_concurrency=limit_concurrency,
                          batcher=BatcherConfig(max_batch=max_batch), limits=_limits(max_image_mb, max_image_pixels))
    app_ = create_worker_app(load_engine(str(model), dtype=dtype, batch_size=max_batch,
                                         prefix_cache_bytes=_mib(prefix_cache_mb)), config)
    typer.echo(f"medvlm worker {config.model_name!r} on {config.worker_url}. {SHORT_NOTICE}")
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command("test-message")
def test_message(
    controller_url: str = typer.Option(..., "--controller", help="Controller URL."),
    model: str = typer.Option(..., "--model", help="Model name (see the controller's list)."),
    message: str | None = typer.Option(None, "--message"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    temperature: float = typer.Option(0.7, "--temperature"),
    template: str | None = typer.Option(None, "--template", help="Chat template (default: what the worker reports)."),
) -> None:
    """Stream one reply through the controller (LLaVA's test_message.py)."""
    from medvlm.serve import client

    models = client.list_models(controller_url)
    typer.echo(f"Models: {models}")
    worker_ = client.worker_address(controller_url, model)
    typer.echo(f"worker_addr: {worker_}")
    msg = message or client.DEFAULT_TEST_MESSAGE
    typer.echo(f"USER: {msg}\nASSISTANT: ", nl=False)
    client.send_test_message(controller_url, model, msg, max_new_tokens=max_new_tokens, temperature=temperature,
                        template=template, worker=worker_ or None,
                        on_text=lambda t: typer.echo(t, nl=False))
    typer.echo("")


@app.command("web")
def web(
    controller_url: str | None = typer.Option(None, "--controller", help="A LLaVA controller URL."),
    api_url: str | None = typer.Option(None, "--api", help="An OpenAI-compatible API URL (medvlm serve api, vLLM)."),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Environment variable with the API key."),
    template: str | None = typer.Option(None, "--template", help="Chat template for workers that do not report one."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(7860, "--port"),
    log_file: Path = typer.Option(Path("medvlm_web_log.jsonl"), "--log-file", help="Votes and flags (JSONL)."),
    log_images: bool = typer.Option(False, "--log-images", help="Also log images with votes/flags."),
    max_images: int = typer.Option(1, "--max-images", help="Images per conversation."),
    example: list[Path] = typer.Option([], "--example", help="Extra example image (repeatable)."),
) -> None:
    """A Gradio chat page (research use only)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from medvlm.serve.web import WebConfig, launch_web
    from medvlm.serve.web_backends import ApiBackend, ControllerBackend

    if (controller_url is None) == (api_url is None):
        raise MedvlmError("give exactly one of --controller URL or --api URL")
    for p in example:
        if not p.is_file():
            raise MedvlmError(f"--example {p}: file not found")
    backend = (ControllerBackend(controller_url, template) if controller_url
               else ApiBackend(api_url, _api_key(api_key_env)))
    config = WebConfig(log_file=log_file, log_images=log_images, max_images=max_images,
                       example_images=tuple(str(p) for p in example))
    launch_web(backend, config, host=host, port=port, block=True)
