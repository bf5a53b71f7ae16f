"""`hayai serve`: an OpenAI-compatible server with continuous batching, and a browser chat page at /."""

from __future__ import annotations

import inspect

import typer

from hayai.cli.app import app, err
from hayai.cli.generate_cmd import DeviceOption, DtypeOption, ThreadsOption

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    model: str = typer.Argument(None, help="Store name, known name, HF checkpoint dir or .gguf file "
                                           "(default: smollm2-135m-instruct)."),
    adapter: str = typer.Option(None, "--adapter", help="A PEFT-format adapter directory to apply."),
    quant: str = typer.Option(None, "--quant", help="Quantize the weights on load (e.g. int8, int4, nf4)."),
    speculate: str = typer.Option(None, "--speculate", help="Speculative decoding per request: 'lookup' (prompt "
                                  "lookup), 'draft:MODEL' (a small draft model) or 'self:LAYER' (early exit). "
                                  "Requests then take turns instead of being batched: best at low concurrency."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default; anything else "
                                                         "exposes the server to the network)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str = typer.Option(None, "--api-key", envvar="HAYAI_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on every /v1 route."),
    max_batch: int = typer.Option(16, "--max-batch", help="Requests decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a batch row; beyond that "
                                                          "the server answers 503 with Retry-After."),
    max_context: int = typer.Option(None, "--max-context", help="Most tokens (prompt + answer) per request "
                                                                "(default: the model's context window)."),
    max_tokens_cap: int = typer.Option(None, "--max-tokens-cap", help="Largest max_tokens a request may ask for."),
    max_body: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="Prompt tokens prefilled per scheduler step "
                                                                   "(long prompts do not stall running answers)."),
    served_name: str = typer.Option(None, "--served-model-name", help="The model id clients use "
                                                                      "(default: the model's store name)."),
    allowed_host: list[str] = typer.Option(None, "--allowed-host", help="Also answer requests whose Host header "
                                           "names this host (e.g. behind a reverse proxy); repeatable. On loopback "
                                           "only loopback names are answered otherwise (DNS-rebinding guard)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (warning hides access logs)."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
) -> None:
    """Serve a model behind the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) with a chat page."""
    import uvicorn

    from hayai.api import load
    from hayai.cli.progress import progress_bar
    from hayai.errors import ConfigError
    from hayai.serve.app import LOOPBACK_HOSTS, ServeSettings, create_app
    from hayai.serve.scheduler import Scheduler

    if max_tokens_cap is not None and max_tokens_cap < 1:
        raise ConfigError(f"--max-tokens-cap must be >= 1, got {max_tokens_cap}")
    extra = _load_options(adapter=adapter, quant=quant)
    with progress_bar() as progress:
        llm = load(model, dtype=dtype, device=device, threads=threads, progress=progress, **extra)
    strategy = _strategy_factory(speculate, llm, dtype, device) if speculate else None
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=max_batch, max_queue=max_queue,
                          max_length=max_context, prefill_chunk=prefill_chunk, strategy=strategy)
    name = served_name or llm.info.name
    loopback = host in LOOPBACK
    settings = ServeSettings(model_name=name, aliases=(llm.info.name,) if served_name else (), api_key=api_key or None,
                             max_tokens_cap=max_tokens_cap, max_body_bytes=max_body,
                             allowed_hosts=_allowed_hosts(loopback, allowed_host or [], LOOPBACK_HOSTS))
    application = create_app(scheduler, llm.tokenizer, settings)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"[bold]{name}[/] on http://{shown}:{port} — chat page at /, OpenAI API at /v1 "
              f"({f'speculative: {speculate}, ' if speculate else ''}batch {max_batch}, queue {max_queue}"
              f"{', API key required' if api_key else ''})")
    err.print(f"KV cache grows with the load, up to {scheduler.cache_bytes_at_full_load() / 2**30:.2f} GiB with "
              f"{max_batch} requests of {scheduler.max_length} tokens (lower --max-batch or --max-context to cap it)",
              style="dim")
    if not loopback and not api_key:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this machine "
                  "can use the server")
    _log_requests(log_level)
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _log_requests(level: str) -> None:
    """One line per finished request on stderr (tokens, queueing, time to first token, speed), like uvicorn's."""
    import logging

    logger = logging.getLogger("hayai.serve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    logger.propagate = False


def _strategy_factory(spec: str, llm, dtype: str, device: str):
    """'lookup', 'draft:MODEL' or 'self:LAYER' -> a factory of per-request SpeculativeDecoding strategies."""
    from hayai.decode.draft_model import DraftModel
    from hayai.decode.prompt_lookup import PromptLookup
    from hayai.decode.self_speculative import EarlyExit
    from hayai.decode.speculative import SpeculativeDecoding
    from hayai.errors import ConfigError

    eos = llm.tokenizer.eos_token_ids
    kind, _, arg = spec.partition(":")
    if kind == "lookup" and not arg:
        return lambda: SpeculativeDecoding(PromptLookup(stop_token_ids=eos))
    if kind == "draft" and arg:
        from hayai.api import load

        draft = load(arg, dtype=dtype, device=device).model
        return lambda: SpeculativeDecoding(DraftModel(draft, stop_token_ids=eos))
    if kind == "self" and arg.isdigit():
        layers = llm.model.config.num_hidden_layers
        if not 0 < int(arg) < layers:
            raise ConfigError(f"--speculate self:LAYER needs 0 < LAYER < {layers} (the model's layers), got {arg}")
        return lambda: SpeculativeDecoding(EarlyExit(exit_layer=int(arg), stop_token_ids=eos))
    raise ConfigError(f"--speculate must be 'lookup', 'draft:MODEL' or 'self:LAYER', got {spec!r}")


def _allowed_hosts(loopback: bool, extra: list[str], loopback_names: frozenset[str]) -> frozenset[str]:
    """Host names to answer for: loopback names on a loopback bind (plus extras); extras only elsewhere; empty = any."""
    extra_names = frozenset(h.lower() for h in extra)
    if loopback:
        return loopback_names | extra_names
    return loopback_names | extra_names if extra_names else frozenset()


def _load_options(**options: str | None) -> dict[str, str]:
    """The load options given, checked against what this version's `hayai.load` accepts."""
    from hayai.api import load
    from hayai.errors import ConfigError

    accepted = inspect.signature(load).parameters
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in accepted:
            raise ConfigError(f"--{key} is not available in this version of hayai (hayai.load has no '{key}')")
    return given
