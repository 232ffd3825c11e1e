"""``medvlm serve``: OpenAI-compatible API, LLaVA controller / worker / test client, and the web UI."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from medvlm.errors import MedvlmError
from medvlm.notice import SHORT_NOTICE

app = typer.Typer(help=f"Serve a medvlm model: OpenAI-compatible API, LLaVA controller/workers, web UI. {SHORT_NOTICE}",
                  no_args_is_help=True)


def _api_key(env: str | None, option: str = "--api-key-env") -> str | None:
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise MedvlmError(f"{option} {env}: the environment variable is not set or empty")
    return key


def _ui_auth(env: str | None) -> tuple[str, str] | None:
    value = _api_key(env, "--auth-env")
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise MedvlmError(f"--auth-env {env}: the variable must hold user:password")
    return user, password


def _limits(max_image_mb: float, max_image_pixels: int, allow_remote: bool = False, remote_timeout: float = 10.0,
            remote_allow_network: list[str] | None = None):
    import ipaddress

    from medvlm.serve.images import ImageLimits

    if max_image_mb <= 0 or max_image_pixels <= 0:
        raise MedvlmError("--max-image-mb and --max-image-pixels must be > 0")
    if remote_timeout <= 0:
        raise MedvlmError("--remote-timeout must be > 0")
    for net in remote_allow_network or []:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise MedvlmError(f"--remote-allow-network {net!r}: not a network (give CIDR, e.g. 10.1.2.0/24)") from None
    if remote_allow_network and not allow_remote:
        raise MedvlmError("--remote-allow-network needs --allow-remote-images")
    return ImageLimits(max_bytes=int(max_image_mb * 1024 * 1024), max_pixels=max_image_pixels,
                       allow_remote=allow_remote, remote_timeout_s=remote_timeout,
                       remote_allow_networks=tuple(remote_allow_network or ()))


def _positive(**values: float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise MedvlmError(f"--{name.replace('_', '-')} must be > 0")


INSECURE_HELP = "Allow a non-loopback --host without a key/secret (anyone who can reach the port can use it)."


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
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs (public addresses only)."),
    remote_timeout: float = typer.Option(10.0, "--remote-timeout", help="Total seconds allowed per remote image (all redirects)."),
    remote_allow_network: list[str] = typer.Option([], "--remote-allow-network", help="Non-public network (CIDR) remote images may come from (repeatable)."),
    max_prompt_chars: int = typer.Option(200_000, "--max-prompt-chars", help="Most characters of text per request (checked before tokenising)."),
    max_decoded_mb: float = typer.Option(512.0, "--max-decoded-mb", help="Estimated decode + preprocessing memory for one request's images (MiB)."),
    max_concurrent_decodes: int = typer.Option(2, "--max-concurrent-decodes", help="Requests decoding images at once."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=INSECURE_HELP),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Log message text (never images)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16."),
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions API (research use only)."""
    from medvlm.serve.api import ApiConfig, load_engine, run_api
    from medvlm.serve.batching import BatcherConfig
    from medvlm.serve.guard import check_bind

    _positive(max_prompt_chars=max_prompt_chars, max_decoded_mb=max_decoded_mb,
              max_concurrent_decodes=max_concurrent_decodes, max_images=max_images)
    key = _api_key(api_key_env)
    check_bind(host, key is not None, insecure_no_auth, "medvlm serve api", "--api-key-env VAR")  # before loading
    config = ApiConfig(model_name=served_model_name or model.resolve().name, api_key=key,
                       batcher=BatcherConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue),
                       limits=_limits(max_image_mb, max_image_pixels, allow_remote_images, remote_timeout,
                                      remote_allow_network),
                       max_images=max_images, log_prompts=log_prompts, max_prompt_chars=max_prompt_chars,
                       max_decoded_bytes=int(max_decoded_mb * 2**20), max_concurrent_decodes=max_concurrent_decodes)
    run_api(load_engine(str(model), dtype=dtype, batch_size=max_batch, prefix_cache_bytes=_mib(prefix_cache_mb)),
            config, host=host, port=port, insecure_no_auth=insecure_no_auth)


@app.command("controller")
def controller(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(21001, "--port"),
    dispatch: str = typer.Option("shortest_queue", "--dispatch", help="shortest_queue | lottery."),
    heart_beat_expiration: float = typer.Option(30.0, "--heart-beat-expiration", help="Drop workers silent this long (s)."),
    secret_env: str | None = typer.Option(None, "--secret-env", help="Environment variable holding the secret shared with workers and clients."),
    max_workers: int = typer.Option(256, "--max-workers", help="Most registered workers."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=INSECURE_HELP),
) -> None:
    """LLaVA's controller: workers register here, clients ask it where to send requests."""
    import uvicorn

    from medvlm.serve.controller import ControllerConfig, create_controller_app
    from medvlm.serve.guard import check_bind

    secret = _api_key(secret_env, "--secret-env")
    check_bind(host, secret is not None, insecure_no_auth, "medvlm serve controller", "--secret-env VAR")
    app_ = create_controller_app(ControllerConfig(dispatch=dispatch, heart_beat_expiration=heart_beat_expiration,
                                                  secret=secret, max_workers=max_workers))
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
    max_images: int = typer.Option(4, "--max-images", help="Most images per request."),
    max_prompt_chars: int = typer.Option(200_000, "--max-prompt-chars", help="Most prompt characters (checked before tokenising)."),
    max_decoded_mb: float = typer.Option(512.0, "--max-decoded-mb", help="Estimated decode + preprocessing memory for one request's images (MiB)."),
    max_concurrent_decodes: int = typer.Option(2, "--max-concurrent-decodes", help="Requests decoding images at once."),
    secret_env: str | None = typer.Option(None, "--secret-env", help="Environment variable holding the controller's shared secret."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=INSECURE_HELP),
    dtype: str | None = typer.Option(None, "--dtype"),
    template: str | None = typer.Option(None, "--template", help="Chat template clients render prompts in (model families; default: the checkpoint's, else vicuna_v1)."),
) -> None:
    """LLaVA's model worker: serves one model (native or a model family) to a controller."""
    import uvicorn

    from medvlm.serve.api import load_engine
    from medvlm.serve.batching import BatcherConfig
    from medvlm.serve.guard import check_bind
    from medvlm.serve.worker import WorkerConfig, create_worker_app

    _positive(max_prompt_chars=max_prompt_chars, max_decoded_mb=max_decoded_mb,
              max_concurrent_decodes=max_concurrent_decodes, max_images=max_images)
    secret = _api_key(secret_env, "--secret-env")
    check_bind(host, secret is not None, insecure_no_auth, "medvlm serve worker", "--secret-env VAR")
    config = WorkerConfig(controller_url=controller_url.rstrip("/"), worker_url=worker_address or f"http://{host}:{port}",
                          model_name=model_name or model.resolve().name, register=not no_register,
                          heart_beat_interval=heart_beat_interval, limit_concurrency=limit_concurrency,
                          batcher=BatcherConfig(max_batch=max_batch), limits=_limits(max_image_mb, max_image_pixels),
                          secret=secret, max_images=max_images, max_prompt_chars=max_prompt_chars,
                          max_decoded_bytes=int(max_decoded_mb * 2**20), max_concurrent_decodes=max_concurrent_decodes,
                          template=template)
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
    secret_env: str | None = typer.Option(None, "--secret-env", help="Environment variable holding the controller's shared secret."),
) -> None:
    """Stream one reply through the controller (LLaVA's test_message.py)."""
    from medvlm.serve import client

    secret = _api_key(secret_env, "--secret-env")
    models = client.list_models(controller_url, secret=secret)
    typer.echo(f"Models: {models}")
    worker_ = client.worker_address(controller_url, model, secret=secret)
    typer.echo(f"worker_addr: {worker_}")
    msg = message or client.DEFAULT_TEST_MESSAGE
    typer.echo(f"USER: {msg}\nASSISTANT: ", nl=False)
    client.send_test_message(controller_url, model, msg, max_new_tokens=max_new_tokens, temperature=temperature,
                        template=template, worker=worker_ or None, secret=secret,
                        on_text=lambda t: typer.echo(t, nl=False))
    typer.echo("")


@app.command("web")
def web(
    controller_url: str | None = typer.Option(None, "--controller", help="A LLaVA controller URL."),
    api_url: str | None = typer.Option(None, "--api", help="An OpenAI-compatible API URL (medvlm serve api, vLLM)."),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Environment variable with the API key."),
    secret_env: str | None = typer.Option(None, "--secret-env", help="Environment variable with the controller's shared secret."),
    auth_env: str | None = typer.Option(None, "--auth-env", help="Environment variable holding user:password for the page's login."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Allow a non-loopback --host without a login (refused anyway when the page holds a key or secret)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest uploaded image (MiB)."),
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
    if controller_url and api_key_env:
        raise MedvlmError("--api-key-env goes with --api; a controller takes --secret-env")
    if api_url and secret_env:
        raise MedvlmError("--secret-env goes with --controller; an API takes --api-key-env")
    _positive(max_upload_mb=max_upload_mb)
    key = _api_key(api_key_env) if api_url else _api_key(secret_env, "--secret-env")
    backend = (ControllerBackend(controller_url, template, secret=key) if controller_url
               else ApiBackend(api_url, key))
    config = WebConfig(log_file=log_file, log_images=log_images, max_images=max_images,
                       example_images=tuple(str(p) for p in example), auth=_ui_auth(auth_env),
                       max_upload_bytes=int(max_upload_mb * 2**20))
    launch_web(backend, config, host=host, port=port, block=True, lends_key=key is not None,
               insecure_no_auth=insecure_no_auth)
