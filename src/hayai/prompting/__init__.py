"""LLM-call-level techniques over any backend: Skeleton-of-Thought, Batch Prompting, FrugalGPT cascades, FiD-ICL.

Everything here reaches a model only through a `Backend` (the local engine or an OpenAI-compatible server), except
FiD-ICL, which works on model internals (encoder states, KV caches) by nature.
"""

from hayai.prompting.backends import (
    Backend,
    BackendError,
    GenParams,
    LocalBackend,
    OpenAIBackend,
    Price,
    PriceTable,
    Result,
)
from hayai.prompting.batch_prompting import BatchAnswers, batch_prompt, format_batch_prompt, parse_batch_answers
from hayai.prompting.cache import CachedBackend, CompletionCache
from hayai.prompting.evalset import QAItem, accuracy, is_correct, load_eval_set, load_sot_questions, read_jsonl
from hayai.prompting.frugal_cascade import (
    Cascade,
    CascadeStrategy,
    Stage,
    prepare_cascade,
    train_cascade,
)
from hayai.prompting.skeleton_of_thought import SkeletonOfThought, SoTAnswer, SoTPrompts, parse_skeleton
from hayai.prompting.sot_router import EmbeddingRouter, PromptRouter

__all__ = [
    "Backend",
    "BackendError",
    "BatchAnswers",
    "CachedBackend",
    "Cascade",
    "CascadeStrategy",
    "CompletionCache",
    "EmbeddingRouter",
    "GenParams",
    "LocalBackend",
    "OpenAIBackend",
    "Price",
    "PriceTable",
    "PromptRouter",
    "QAItem",
    "Result",
    "SkeletonOfThought",
    "SoTAnswer",
    "SoTPrompts",
    "Stage",
    "accuracy",
    "batch_prompt",
    "format_batch_prompt",
    "is_correct",
    "load_eval_set",
    "load_sot_questions",
    "parse_batch_answers",
    "parse_skeleton",
    "prepare_cascade",
    "read_jsonl",
    "train_cascade",
]
