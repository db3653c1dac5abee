"""Results -> OpenAI objects: whole completions, stream chunks, usage, logprobs, finish reasons.

Owns the output side of the HTTP API: what one request's `Delta`s (scheduler_svc.frontend.handle) become in
OpenAI's shapes (schemas.py). A request of n samples has n choices (`index` = the sample). A stream
is a `ChunkWriter` per request: each sample's delta becomes at most one chunk (none when it carries
nothing the client asked for), a sample's last one with its finish reason, then, once every sample
has ended, the usage chunk when `stream_options.include_usage` was given. Finish reasons: EOS, a stop string or
a stop token -> "stop" (vLLM's `stop_reason` says which string or token), LENGTH -> "length".
"""

from __future__ import annotations

from scheduler_svc.core.request import FinishReason
from scheduler_svc.frontend.handle import Completion as Done
from scheduler_svc.frontend.handle import Delta
from scheduler_svc.frontend.http_api import schemas as s
from scheduler_svc.frontend.http_api.convert import Spec
from scheduler_svc.frontend.tokenizer import TandemTokenizer

FINISH = {FinishReason.EOS: "stop", FinishReason.STOP_STRING: "stop", FinishReason.STOP_TOKEN: "stop",
          FinishReason.LENGTH: "length", FinishReason.ABORTED: "abort"}

Logprobs = list[tuple[int, float, list[tuple[int, float]]]]


def finish_reason(done: Done) -> tuple[str, str | int | None]:
    """OpenAI's finish_reason and vLLM's stop_reason (the stop string or stop token id matched)."""
    stop = done.stop_string if done.stop_string is not None else done.stop_token_id
    return FINISH.get(done.finish_reason, "stop"), stop


def usage(dones: list[Done]) -> s.Usage:
    """One request's usage: its prompt once, the tokens of all its samples (n), the prompt tokens
    sample 0 found in the prefix cache (the samples after it read the blocks it computed)."""
    prompt = dones[0].prompt_tokens
    completion = sum(d.completion_tokens for d in dones)
    return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=s.PromptTokensDetails(cached_tokens=dones[0].cached_tokens))


class TokenText:
    """Token ids -> the text pieces logprobs name them by (each decoded alone, special tokens kept)."""

    def __init__(self, tokenizer: TandemTokenizer | None) -> None:
        self._tok = tokenizer  # None: a server without a tokenizer (--skip-tokenizer) names no tokens

    def __call__(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False) if self._tok is not None else ""


def completion_logprobs(items: Logprobs, text: TokenText, offset: int) -> tuple[s.CompletionLogprobs, int]:
    """The legacy completions logprobs object; `offset` is where the first token's text starts."""
    out = s.CompletionLogprobs()
    for token_id, logprob, top in items:
        piece = text(token_id)
        out.tokens.append(piece)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append({text(i): v for i, v in top})
        out.text_offset.append(offset)
        offset += len(piece)
    return out, offset


def chat_logprobs(items: Logprobs, text: TokenText) -> s.ChoiceLogprobs:
    content = []
    for token_id, logprob, top in items:
        piece = text(token_id)
        tops = [s.TopLogprob(token=(t := text(i)), logprob=v, bytes=list(t.encode())) for i, v in top]
        content.append(s.TokenLogprob(token=piece, logprob=logprob, bytes=list(piece.encode()), top_logprobs=tops))
    return s.ChoiceLogprobs(content=content)


def whole(spec: Spec, rid: str, created: int, model: str, deltas: list[Delta],
          text: TokenText) -> s.Completion | s.ChatCompletion:
    """The non-streaming response of a finished request: one choice per sample, each sample's one
    delta holding everything."""
    dones = [d.completion for d in deltas if d.completion is not None]
    assert len(dones) == len(deltas)
    chat_choices, choices = [], []
    for index, delta in enumerate(deltas):
        assert delta.completion is not None
        reason, stop = finish_reason(delta.completion)
        ids = list(delta.token_ids) if spec.return_token_ids else None
        if spec.chat:
            lp = chat_logprobs(delta.logprobs, text) if spec.logprobs is not None else None
            chat_choices.append(s.ChatChoice(index=index, message=s.AssistantMessage(content=delta.text), logprobs=lp,
                                             finish_reason=reason, stop_reason=stop, token_ids=ids))
        else:
            clp = completion_logprobs(delta.logprobs, text, 0)[0] if spec.logprobs is not None else None
            choices.append(s.CompletionChoice(index=index, text=delta.text, logprobs=clp, finish_reason=reason,
                                              stop_reason=stop, token_ids=ids))
    if spec.chat:
        return s.ChatCompletion(id=rid, created=created, model=model, choices=chat_choices, usage=usage(dones))
    return s.Completion(id=rid, created=created, model=model, choices=choices, usage=usage(dones))


class ChunkWriter:
    """One streaming request's chunks, as JSON strings (the SSE framing is the app's)."""

    def __init__(self, spec: Spec, rid: str, created: int, model: str, text: TokenText) -> None:
        self.spec, self.rid, self.created, self.model, self.text = spec, rid, created, model, text
        self._offset: dict[int, int] = {}  # per sample, completions logprobs: text offset of the next token
        self._role_sent: set[int] = set()

    def chunk(self, index: int, delta: Delta) -> str | None:
        """The chunk for sample `index`'s `delta`, or None when it has nothing to say (text held back, no
        logprobs asked)."""
        spec = self.spec
        reason = stop = None
        if delta.completion is not None:
            reason, stop = finish_reason(delta.completion)
        has_tokens = bool(delta.token_ids) and (spec.return_token_ids or spec.logprobs is not None)
        if not delta.text and not has_tokens and reason is None:
            return None
        ids = list(delta.token_ids) if spec.return_token_ids else None
        if spec.chat:
            lp = chat_logprobs(delta.logprobs, self.text) if spec.logprobs is not None else None
            role = None if index in self._role_sent else "assistant"
            self._role_sent.add(index)
            choice = s.ChatChunkChoice(index=index, delta=s.DeltaMessage(role=role, content=delta.text), logprobs=lp,
                                       finish_reason=reason, stop_reason=stop, token_ids=ids)
            return s.ChatCompletionChunk(id=self.rid, created=self.created, model=self.model,
                                         choices=[choice]).model_dump_json()
        clp = None
        if spec.logprobs is not None:
            clp, self._offset[index] = completion_logprobs(delta.logprobs, self.text, self._offset.get(index, 0))
        cchoice = s.CompletionChoice(index=index, text=delta.text, logprobs=clp, finish_reason=reason, stop_reason=stop,
                                     token_ids=ids)
        return s.Completion(id=self.rid, created=self.created, model=self.model, choices=[cchoice]).model_dump_json()

    def usage_chunk(self, dones: list[Done]) -> str | None:
        """stream_options.include_usage: a last chunk (after every sample's end) with no choices and the usage."""
        if not self.spec.include_usage:
            return None
        cls = s.ChatCompletionChunk if self.spec.chat else s.Completion
        out = cls(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage(dones))
        return out.model_dump_json()
