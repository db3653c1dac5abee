"""One generation request as the scheduler sees it: what was asked, and how far it has got.

Owns the request's identity, sampling parameters and scheduling state. A request's token sequence is
`prompt_ids + output_ids` (confirmed tokens) followed by `num_inflight` samples that steps already
sent will produce; `num_computed` of those tokens have their KV written or scheduled. Everything else
(lengths, what is left to compute) is derived, so there is one source of truth. While a request runs,
its counters live in its row slot's columns of the scheduler's `RowTable` (so a step can be planned
with numpy over every row at once); the properties below read them from there, and from the
request's own fields when it holds no slot.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler_svc.core.row_table import RowTable

UINT64_MAX = (1 << 64) - 1


class FinishReason(enum.IntEnum):
    """Same values as tandem.v1.api_pb2.FinishReason (0 = UNSPECIFIED is never a finish)."""

    EOS = 1
    STOP_STRING = 2
    STOP_TOKEN = 3
    LENGTH = 4
    ABORTED = 5


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: no KV blocks held
    RUNNING = "running"  # admitted: holds KV blocks, scheduled each step it can be
    FINISHED = "finished"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    # The worker's counter-based RNG is keyed by (seed, position); a fresh seed when the client gave none.
    seed: int = field(default_factory=lambda: secrets.randbits(64))
    num_logprobs: int = -1  # -1 = none, 0 = the sampled token's only, n = plus the top n
    # Applied by the worker from per-slot device state (worker_svc/penalties.py); the defaults are off.
    repetition_penalty: float = 1.0  # transformers': over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI's: over generated tokens only
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # EOS and stop tokens masked until this many tokens are generated

    def __post_init__(self) -> None:
        assert 0 <= self.seed <= UINT64_MAX, f"seed {self.seed} is not a uint64"

    @property
    def penalized(self) -> bool:
        """Whether the worker must keep token counts for it (the rest of the state is per-row scalars)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "ebnf", "lark")


@dataclass(frozen=True)
class Constraint:
    """Structured output: what every sampled token must keep the output within (the worker's grammar
    engine compiles it, worker_svc/structured/grammar.py). `spec` by kind: json_schema the schema's JSON text,
    json_object "" (any JSON object), regex the pattern, choice a JSON list of the strings, ebnf / lark
    the grammar's text."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        assert self.kind in CONSTRAINT_KINDS, f"unknown constraint kind {self.kind!r}"

    @property
    def key(self) -> str:
        """What names its compiled form on both sides of the engine link: equal constraints compile once."""
        return hashlib.sha256(f"{self.kind}\0{self.spec}".encode()).hexdigest()


@dataclass(eq=False)
class Request:
    req_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    client_id: str = ""  # the client-facing request id (x-request-id or generated): for logs
    uid: int = 0  # the front end's number for it (core.proto): how the two processes name it
    cache_salt: str = ""  # requests with different salts never share a cached block
    num_samples: int = 1  # n: the front end expands it into n requests (frontend/sample_group.py)
    sample_index: int = 0  # which of its prompt's n samples this request is
    # Sample i > 0 of n waits for sample 0 (`leader`) to have its prompt computed, so that its prompt's
    # full blocks come from the prefix cache: one prefill for n samples.
    leader: Request | None = field(default=None, repr=False)
    prompt_sent_step: int = -1  # the step that computed its last prompt token (-1: not yet)
    constraint: Constraint | None = None  # structured output; None = free

    # Scheduling state, owned by the Scheduler.
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    slot: int = -1  # the worker row slot it runs in; -1 while it holds none
    rows: RowTable | None = field(default=None, repr=False)  # set with `slot`: where the counters live
    # The counters while the request holds no slot (see num_computed, num_inflight, last_sample).
    _computed: int = 0
    _inflight: int = 0
    _last_sample: tuple[int, int] | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    prefix_keys: list = field(default_factory=list, repr=False)  # block_manager.PrefixKey per full block, lazily
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        assert len(self.prompt_ids) > 0, "empty prompt"
        assert self.max_new_tokens >= 1, "max_new_tokens must be >= 1"

    @property
    def num_computed(self) -> int:
        """Tokens whose KV is written or scheduled in a step already sent."""
        return int(self.rows.computed[self.slot]) if self.rows is not None else self._computed

    @num_computed.setter
    def num_computed(self, value: int) -> None:
        if self.rows is not None:
            self.rows.computed[self.slot] = value
        else:
            self._computed = value

    @property
    def num_inflight(self) -> int:
        """Samples scheduled in sent steps whose results have not arrived."""
        return int(self.rows.inflight[self.slot]) if self.rows is not None else self._inflight

    @property
    def last_sample(self) -> tuple[int, int] | None:
        """(step_id, row) of the newest in-flight sample."""
        if self.rows is None:
            return self._last_sample
        if self.rows.inflight[self.slot] == 0:
            return None
        return int(self.rows.last_step[self.slot]), int(self.rows.last_row[self.slot])

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def token_cap(self) -> int:
        """Tokens (prompt + outputs) it may reach: its max_new_tokens, or the context limit."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus confirmed outputs: the tokens whose ids the scheduler has."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the in-flight samples that will follow them."""
        return self.num_known_tokens + self.num_inflight

    @property
    def num_to_compute(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def num_promised_outputs(self) -> int:
        """Outputs this request will have once every in-flight sample has arrived."""
        return len(self.output_ids) + self.num_inflight

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Known token ids at positions [start, end)."""
        assert 0 <= start <= end <= self.num_known_tokens
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time
