"""`hayai generate` and `hayai chat`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from hayai.cli.app import app, err

if TYPE_CHECKING:
    from hayai.api import LLM

ModelOption = typer.Option(None, "--model", "-m", help="Store name, known name, HF checkpoint dir or .gguf file.")
DtypeOption = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16 (auto: bf16 where the CPU has it).")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
ThreadsOption = typer.Option(None, "--threads", help="CPU threads (default: physical cores).")
AdapterOption = typer.Option(None, "--adapter", help="A PEFT adapter directory (e.g. from hayai finetune) to apply.")
QuantOption = typer.Option(None, "--quant", help="Quantize the weights after loading: int8 or int4 "
                                                "(or load a copy saved by `hayai quantize`).")
GroupSizeOption = typer.Option(None, "--group-size", help="int4 group size (32, 64, 128; default 32).")
CompileOption = typer.Option(False, "--compile", help="torch.compile the decode step (the first use compiles).")
SpeculateOption = typer.Option(None, "--speculate", help="Lossless faster decoding: lookup, draft (with --draft), "
                                                        "self, lookahead or jacobi.")
DraftOption = typer.Option(None, "--draft", help="Draft model for --speculate draft (same tokenizer).")
DraftTokensOption = typer.Option(None, "--draft-tokens", help="Most tokens drafted per step (default 8).")
ExitLayerOption = typer.Option(None, "--exit-layer", help="--speculate self: draft with this many first layers "
                                                         "(default: half).")


def load_llm(model: str | None, dtype: str, device: str, threads: int | None, adapter: str | None = None,
             quant: str | None = None, group_size: int | None = None, compile: bool = False) -> LLM:
    from hayai.api import load
    from hayai.cli.progress import progress_bar

    with progress_bar() as progress:
        llm = load(model, dtype=dtype, device=device, threads=threads, progress=progress, adapter=adapter,
                   quant=quant, group_size=group_size, compile=compile)
    if compile:
        err.print("compiling the decode step on first use (tens of seconds; cached on disk afterwards)", style="dim")
    return llm


def speculation(llm: LLM, speculate: str | None, draft: str | None, draft_tokens: int | None,
                exit_layer: int | None) -> dict:
    """Keyword arguments of `LLM.stream` for the --speculate options."""
    if speculate is None:
        return {}
    from hayai.decode.strategies import SpeculateOptions

    options = SpeculateOptions(exit_layer=exit_layer)
    if draft_tokens is not None:
        options.max_draft, options.draft_tokens = draft_tokens, min(options.draft_tokens, draft_tokens)
    return {"strategy": llm.strategy(speculate, draft=draft, options=options)}


def _report(llm: LLM, stats) -> None:
    err.print(stats.summary(), style="dim")
    reason = getattr(llm.model, "fallback_reason", None)
    if reason:
        err.print(f"--compile fell back to eager decoding: {reason}", style="yellow")


def _read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin.isatty() and prompt is None:
            raise typer.BadParameter("give a prompt, or '-' to read it from standard input")
        return sys.stdin.read()
    return prompt


@app.command()
def generate(
    prompt: str = typer.Argument(None, help="The prompt ('-' reads standard input)."),
    model: str = ModelOption,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Maximum new tokens."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable)."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    system: str = typer.Option(None, "--system", help="System message (chat models)."),
    truncate: bool = typer.Option(False, "--truncate", help="Drop the start of a prompt that does not fit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No speed report on stderr."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
    adapter: str = AdapterOption,
    quant: str = QuantOption,
    group_size: int = GroupSizeOption,
    compile: bool = CompileOption,
    speculate: str = SpeculateOption,
    draft: str = DraftOption,
    draft_tokens: int = DraftTokensOption,
    exit_layer: int = ExitLayerOption,
) -> None:
    """Stream a completion to stdout (and only the completion, so it pipes); a speed report goes to stderr."""
    text = _read_prompt(prompt)
    llm = load_llm(model, dtype, device, threads, adapter, quant, group_size, compile)
    stream = llm.stream(text, raw=raw, system=system, max_tokens=max_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=stop or (), truncate=truncate,
                        **speculation(llm, speculate, draft, draft_tokens, exit_layer))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet:
        _report(llm, stream.completion.stats)


@app.command()
def chat(
    model: str = ModelOption,
    system: str = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Maximum new tokens per answer."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p"),
    seed: int = typer.Option(None, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No speed report after each answer."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
    adapter: str = AdapterOption,
    url: str = typer.Option(None, "--url", help="Chat with a running server (hayai serve or any OpenAI-compatible "
                                                "one) instead of loading a model, e.g. http://127.0.0.1:8000."),
    api_key: str = typer.Option(None, "--api-key", envvar="HAYAI_API_KEY", help="The server's API key (--url)."),
    quant: str = QuantOption,
    group_size: int = GroupSizeOption,
    compile: bool = CompileOption,
    speculate: str = SpeculateOption,
    draft: str = DraftOption,
) -> None:
    """A multi-turn chat in the terminal. /reset clears the conversation, /exit (or Ctrl-D) leaves."""
    from hayai.errors import ContextOverflowError

    spec: dict = {}
    if url:
        from hayai.serve.client import RemoteLLM

        llm = RemoteLLM(url, api_key=api_key, model=model)
    else:
        llm = load_llm(model, dtype, device, threads, adapter, quant, group_size, compile)
        spec = speculation(llm, speculate, draft, None, None)  # one strategy object serves every answer
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = []
    if interactive:
        err.print(f"[bold]{llm.info.name}[/] — /reset to start over, /exit to leave")
    while True:
        try:
            line = err.input("[bold cyan]you>[/] ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            err.print("conversation cleared")
            continue
        history.append({"role": "user", "content": line})
        while True:
            try:
                stream = llm.stream(base + history, max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, **spec)
                if interactive:
                    sys.stdout.write("\x1b[1;32mbot>\x1b[0m ")
                pieces = []
                for piece in stream:
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                break
            except ContextOverflowError:
                if len(history) <= 1:
                    raise
                del history[:2]  # forget the oldest exchange and try again
                err.print("(the conversation outgrew the context window; dropped the oldest exchange)",
                          style="dim")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
        if not quiet:
            err.print(stream.completion.stats.summary(), style="dim")
