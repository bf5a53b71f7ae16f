"""A persistent completion cache (SQLite), as in FrugalGPT's `LLMVanilla` (Chen, Zaharia & Zou 2023,
arXiv 2305.05176), and a backend wrapper that consults it.

    key = sha256( json({"backend": backend.id, "params": params, "prompt": prompt}, sort_keys) )

The backend id names the server and the model, and the parameters include max_tokens, temperature, top_p, seed
and the stop strings, so a hit returns exactly what the same request produced before. A hit makes no backend
call; the stored Result keeps its nominal usage and cost and is marked `cached=True`. Sampled completions
(temperature > 0 without a seed) are cached too, as FrugalGPT does: a cache fixes one sample per request.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from hayai.prompting.backends import Backend, GenParams, Prompt, Result

_SCHEMA = "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, backend TEXT, result TEXT)"


def cache_key(backend_id: str, prompt: Prompt, params: GenParams) -> str:
    prompt_json = prompt if isinstance(prompt, str) else [dict(m) for m in prompt]
    blob = json.dumps({"backend": backend_id, "params": params.as_dict(), "prompt": prompt_json},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CompletionCache:
    """Results by key in one SQLite file (":memory:" for a throwaway cache). Safe to share between threads."""

    def __init__(self, path: str | Path = ":memory:"):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute(_SCHEMA)
        self._db.commit()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Result | None:
        with self._lock:
            row = self._db.execute("SELECT result FROM completions WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return replace(Result(**json.loads(row[0])), cached=True)

    def put(self, key: str, result: Result) -> None:
        blob = json.dumps({**asdict(result), "cached": False})
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?)", (key, result.backend, blob))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class CachedBackend:
    """A backend that answers from the cache where it can and sends only the misses, in one call."""

    def __init__(self, backend: Backend, cache: CompletionCache):
        self.backend = backend
        self.cache = cache
        self.id = backend.id

    def complete(self, prompts: Sequence[Prompt], params: GenParams) -> list[Result]:
        keys = [cache_key(self.id, p, params) for p in prompts]
        results: list[Result | None] = [self.cache.get(k) for k in keys]
        todo: dict[str, int] = {}  # key of each miss -> its first prompt (duplicates are sent once)
        for i, result in enumerate(results):
            if result is None:
                todo.setdefault(keys[i], i)
        if todo:
            fresh = self.backend.complete([prompts[i] for i in todo.values()], params)
            by_key = dict(zip(todo, fresh, strict=True))
            for key, result in by_key.items():
                self.cache.put(key, result)
            results = [r if r is not None else by_key[keys[i]] for i, r in enumerate(results)]
        return results  # type: ignore[return-value]
