"""``medvlm serve``: OpenAI-compatible API, LLaVA controller / worker / test client, and the web UI; ``medvlm chat``.

A served model's name is ``--served-model-name`` everywhere (vLLM's spelling).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from medvlm.errors import MedvlmError
from medvlm.notice import SHORT_NOTICE
from medvlm.utils.cli import renamed

app = typer.Typer(
    help=f"Serve a medvlm model: OpenAI-compatible API, LLaVA controller/workers, web UI. {SHORT_NOTICE}",
    no_args_is_help=True,
)


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


def _limits(
    max_image_mb: float,
    max_image_pixels: int,
    allow_remote: bool = False,
    remote_timeout: float = 10.0,
    remote_allow_network: list[str] | None = None,
):
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
    return ImageLimits(
        max_bytes=int(max_image_mb * 1024 * 1024),
        max_pixels=max_image_pixels,
        allow_remote=allow_remote,
        remote_timeout_s=remote_timeout,
        remote_allow_networks=tuple(remote_allow_network or ()),
    )


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
    model: Annotated[Path, typer.Option("--model", help="A medvlm checkpoint folder.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Environment variable holding the required API key.")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Model name for clients (default: folder name).")
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most requests decoded together (1 = one at a time).")
    ] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option("--max-wait-ms", help="When idle, how long a first request waits for others to prefill with."),
    ] = 5.0,
    prefix_cache_mb: Annotated[
        float, typer.Option("--prefix-cache-mb", help="Prefix KV-cache budget in MiB (0 = off).")
    ] = 1024.0,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests in flight before 503.")] = 64,
    max_image_mb: Annotated[float, typer.Option("--max-image-mb", help="Largest image (MiB).")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", help="Largest image in pixels.")] = 40_000_000,
    max_images: Annotated[int, typer.Option("--max-images", help="Most images per request.")] = 4,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="Fetch http(s) image URLs (public addresses only).")
    ] = False,
    remote_timeout: Annotated[
        float, typer.Option("--remote-timeout", help="Total seconds allowed per remote image (all redirects).")
    ] = 10.0,
    remote_allow_network: Annotated[
        list[str] | None,
        typer.Option(
            "--remote-allow-network", help="Non-public network (CIDR) remote images may come from (repeatable)."
        ),
    ] = None,
    max_prompt_chars: Annotated[
        int, typer.Option("--max-prompt-chars", help="Most characters of text per request (checked before tokenising).")
    ] = 200_000,
    max_decoded_mb: Annotated[
        float,
        typer.Option(
            "--max-decoded-mb", help="Estimated decode + preprocessing memory for one request's images (MiB)."
        ),
    ] = 512.0,
    max_concurrent_decodes: Annotated[
        int, typer.Option("--max-concurrent-decodes", help="Requests decoding images at once.")
    ] = 2,
    insecure_no_auth: Annotated[bool, typer.Option("--insecure-no-auth", help=INSECURE_HELP)] = False,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log message text (never images).")] = False,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 | bfloat16 | float16.")] = None,
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions API (research use only)."""
    from medvlm.serve.api import ApiConfig, load_engine, run_api
    from medvlm.serve.batching import BatcherConfig
    from medvlm.serve.guard import check_bind

    _positive(
        max_prompt_chars=max_prompt_chars,
        max_decoded_mb=max_decoded_mb,
        max_concurrent_decodes=max_concurrent_decodes,
        max_images=max_images,
    )
    key = _api_key(api_key_env)
    check_bind(host, key is not None, insecure_no_auth, "medvlm serve api", "--api-key-env VAR")  # before loading
    config = ApiConfig(
        model_name=served_model_name or model.resolve().name,
        api_key=key,
        batcher=BatcherConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue),
        limits=_limits(max_image_mb, max_image_pixels, allow_remote_images, remote_timeout, remote_allow_network),
        max_images=max_images,
        log_prompts=log_prompts,
        max_prompt_chars=max_prompt_chars,
        max_decoded_bytes=int(max_decoded_mb * 2**20),
        max_concurrent_decodes=max_concurrent_decodes,
    )
    run_api(
        load_engine(str(model), dtype=dtype, batch_size=max_batch, prefix_cache_bytes=_mib(prefix_cache_mb)),
        config,
        host=host,
        port=port,
        insecure_no_auth=insecure_no_auth,
    )


@app.command("controller")
def controller(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 21001,
    dispatch: Annotated[str, typer.Option("--dispatch", help="shortest_queue | lottery.")] = "shortest_queue",
    heart_beat_expiration: Annotated[
        float, typer.Option("--heart-beat-expiration", help="Drop workers silent this long (s).")
    ] = 30.0,
    secret_env: Annotated[
        str | None,
        typer.Option("--secret-env", help="Environment variable holding the secret shared with workers and clients."),
    ] = None,
    max_workers: Annotated[int, typer.Option("--max-workers", help="Most registered workers.")] = 256,
    insecure_no_auth: Annotated[bool, typer.Option("--insecure-no-auth", help=INSECURE_HELP)] = False,
) -> None:
    """LLaVA's controller: workers register here, clients ask it where to send requests."""
    import uvicorn

    from medvlm.serve.controller import ControllerConfig, create_controller_app
    from medvlm.serve.guard import check_bind

    secret = _api_key(secret_env, "--secret-env")
    check_bind(host, secret is not None, insecure_no_auth, "medvlm serve controller", "--secret-env VAR")
    app_ = create_controller_app(
        ControllerConfig(
            dispatch=dispatch, heart_beat_expiration=heart_beat_expiration, secret=secret, max_workers=max_workers
        )
    )
    typer.echo(f"medvlm controller on http://{host}:{port} ({dispatch}). {SHORT_NOTICE}")
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command("worker", cls=renamed({"--model-name": "--served-model-name"}))
def worker(
    controller_url: Annotated[str, typer.Option("--controller", help="Controller URL, e.g. http://127.0.0.1:21001.")],
    model: Annotated[Path, typer.Option("--model", help="A medvlm checkpoint folder.")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 21002,
    worker_address: Annotated[
        str | None, typer.Option("--worker-address", help="Address the controller calls (default http://HOST:PORT).")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Name to serve under (default: folder name).")
    ] = None,
    limit_concurrency: Annotated[int, typer.Option("--limit-concurrency", help="Requests in flight.")] = 5,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most requests decoded together.")] = 8,
    prefix_cache_mb: Annotated[
        float, typer.Option("--prefix-cache-mb", help="Prefix KV-cache budget in MiB (0 = off).")
    ] = 1024.0,
    heart_beat_interval: Annotated[
        float, typer.Option("--heart-beat-interval", help="Seconds between heart beats.")
    ] = 15.0,
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not register with the controller.")] = False,
    max_image_mb: Annotated[float, typer.Option("--max-image-mb")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels")] = 40_000_000,
    max_images: Annotated[int, typer.Option("--max-images", help="Most images per request.")] = 4,
    max_prompt_chars: Annotated[
        int, typer.Option("--max-prompt-chars", help="Most prompt characters (checked before tokenising).")
    ] = 200_000,
    max_decoded_mb: Annotated[
        float,
        typer.Option(
            "--max-decoded-mb", help="Estimated decode + preprocessing memory for one request's images (MiB)."
        ),
    ] = 512.0,
    max_concurrent_decodes: Annotated[
        int, typer.Option("--max-concurrent-decodes", help="Requests decoding images at once.")
    ] = 2,
    secret_env: Annotated[
        str | None, typer.Option("--secret-env", help="Environment variable holding the controller's shared secret.")
    ] = None,
    insecure_no_auth: Annotated[bool, typer.Option("--insecure-no-auth", help=INSECURE_HELP)] = False,
    dtype: Annotated[str | None, typer.Option("--dtype")] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Chat template clients render prompts in (model families; default: the checkpoint's, else vicuna_v1).",
        ),
    ] = None,
) -> None:
    """LLaVA's model worker: serves one model (native or a model family) to a controller."""
    import uvicorn

    from medvlm.serve.api import load_engine
    from medvlm.serve.batching import BatcherConfig
    from medvlm.serve.guard import check_bind
    from medvlm.serve.worker import WorkerConfig, create_worker_app

    _positive(
        max_prompt_chars=max_prompt_chars,
        max_decoded_mb=max_decoded_mb,
        max_concurrent_decodes=max_concurrent_decodes,
        max_images=max_images,
    )
    secret = _api_key(secret_env, "--secret-env")
    check_bind(host, secret is not None, insecure_no_auth, "medvlm serve worker", "--secret-env VAR")
    config = WorkerConfig(
        controller_url=controller_url.rstrip("/"),
        worker_url=worker_address or f"http://{host}:{port}",
        model_name=served_model_name or model.resolve().name,
        register=not no_register,
        heart_beat_interval=heart_beat_interval,
        limit_concurrency=limit_concurrency,
        batcher=BatcherConfig(max_batch=max_batch),
        limits=_limits(max_image_mb, max_image_pixels),
        secret=secret,
        max_images=max_images,
        max_prompt_chars=max_prompt_chars,
        max_decoded_bytes=int(max_decoded_mb * 2**20),
        max_concurrent_decodes=max_concurrent_decodes,
        template=template,
    )
    app_ = create_worker_app(
        load_engine(str(model), dtype=dtype, batch_size=max_batch, prefix_cache_bytes=_mib(prefix_cache_mb)), config
    )
    typer.echo(f"medvlm worker {config.model_name!r} on {config.worker_url}. {SHORT_NOTICE}")
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command("test-message", cls=renamed({"--model": "--served-model-name"}))
def test_message(
    controller_url: Annotated[str, typer.Option("--controller", help="Controller URL.")],
    served_model_name: Annotated[
        str, typer.Option("--served-model-name", help="The worker's served model name (see the controller's list).")
    ],
    message: Annotated[str | None, typer.Option("--message")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.7,
    template: Annotated[
        str | None, typer.Option("--template", help="Chat template (default: what the worker reports).")
    ] = None,
    secret_env: Annotated[
        str | None, typer.Option("--secret-env", help="Environment variable holding the controller's shared secret.")
    ] = None,
) -> None:
    """Stream one reply through the controller (LLaVA's test_message.py)."""
    from medvlm.serve import client

    secret = _api_key(secret_env, "--secret-env")
    models = client.list_models(controller_url, secret=secret)
    typer.echo(f"Models: {models}")
    worker_ = client.worker_address(controller_url, served_model_name, secret=secret)
    typer.echo(f"worker_addr: {worker_}")
    msg = message or client.DEFAULT_TEST_MESSAGE
    typer.echo(f"USER: {msg}\nASSISTANT: ", nl=False)
    client.send_test_message(
        controller_url,
        served_model_name,
        msg,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        template=template,
        worker=worker_ or None,
        secret=secret,
        on_text=lambda t: typer.echo(t, nl=False),
    )
    typer.echo("")


@app.command("web")
def web(
    controller_url: Annotated[str | None, typer.Option("--controller", help="A LLaVA controller URL.")] = None,
    api_url: Annotated[
        str | None, typer.Option("--api", help="An OpenAI-compatible API URL (medvlm serve api, vLLM).")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Environment variable with the API key.")
    ] = None,
    secret_env: Annotated[
        str | None, typer.Option("--secret-env", help="Environment variable with the controller's shared secret.")
    ] = None,
    auth_env: Annotated[
        str | None, typer.Option("--auth-env", help="Environment variable holding user:password for the page's login.")
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Allow a non-loopback --host without a login (refused anyway when the page holds a key or secret).",
        ),
    ] = False,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest uploaded image (MiB).")] = 20.0,
    template: Annotated[
        str | None, typer.Option("--template", help="Chat template for workers that do not report one.")
    ] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 7860,
    log_file: Annotated[Path, typer.Option("--log-file", help="Votes and flags (JSONL).")] = Path(
        "medvlm_web_log.jsonl"
    ),
    log_images: Annotated[bool, typer.Option("--log-images", help="Also log images with votes/flags.")] = False,
    max_images: Annotated[int, typer.Option("--max-images", help="Images per conversation.")] = 1,
    example: Annotated[list[Path] | None, typer.Option("--example", help="Extra example image (repeatable).")] = None,
) -> None:
    """A Gradio chat page (research use only)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from medvlm.serve.web import WebConfig, launch_web
    from medvlm.serve.web_backends import ApiBackend, ControllerBackend

    example = example or []
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
    backend = ControllerBackend(controller_url, template, secret=key) if controller_url else ApiBackend(api_url, key)
    config = WebConfig(
        log_file=log_file,
        log_images=log_images,
        max_images=max_images,
        example_images=tuple(str(p) for p in example),
        auth=_ui_auth(auth_env),
        max_upload_bytes=int(max_upload_mb * 2**20),
    )
    launch_web(
        backend, config, host=host, port=port, block=True, lends_key=key is not None, insecure_no_auth=insecure_no_auth
    )


# `medvlm chat`: a top-level verb (registered by medvlm.cli), beside the serving verbs it shares the engine with.
def chat(
    model: Annotated[Path, typer.Option("--model", help="A medvlm checkpoint folder.")],
    image: Annotated[
        list[str] | None, typer.Option("--image", help="Image file (repeatable; relative to --image-folder if given).")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            help="The question (without it: interactive chat). "
            "Put <image> where an image goes (default: images first).",
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Upper bound on answer tokens.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic).")] = 0.0,
    image_folder: Annotated[
        Path | None, typer.Option("--image-folder", help="Folder that relative --image paths are in.")
    ] = None,
) -> None:
    """Answer a question about image(s), or chat interactively without --prompt (research use only)."""
    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.infer.loading import load_for_inference
    from medvlm.serve.chat import build_chat_sample, interactive_chat

    image = image or []
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    if prompt is not None:
        sample = build_chat_sample(prompt, image)
        m, processor = load_for_inference(model)
        answer = InferenceEngine(m, processor).generate([sample], settings, image_folder=image_folder)[0]
        typer.echo(answer)
        return
    from medvlm.data.images import load_image

    settings.validate()
    paths = [Path(p) if Path(p).is_absolute() or image_folder is None else image_folder / p for p in image]
    images = [load_image(p) for p in paths]  # bad paths fail before the model loads
    m, processor = load_for_inference(model)
    interactive_chat(InferenceEngine(m, processor), settings, images, image_folder=image_folder)
