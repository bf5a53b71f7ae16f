"""hayai.decode: the generation engine and the ways to produce tokens faster.

- `engine`: prefill, the decode loop over a static KV cache, streaming, stop conditions (`Engine`, `DecodeStrategy`);
- `sampling`: temperature / top-k / top-p;
- `speculative` + `rejection`: draft-then-verify decoding, greedy and exact speculative sampling;
- candidate sources: `prompt_lookup`, `draft_model`, `self_speculative` (early exit, int4 self-draft), `jacobi`;
- `draft_length`: adaptive draft length; `lookahead`: Jacobi window + n-gram pool; `fastcot`: early answers;
- `batched_speculative`: speculative decoding for batches; `compiled` + `fused`: fewer operations per token;
- `strategies`: the strategies by name (`--speculate NAME`).
"""
