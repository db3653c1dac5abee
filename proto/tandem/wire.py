"""The engine link's wire format: typed step messages <-> ZeroMQ multipart frames.

Owns the encoding both processes speak (schema in engine.proto): frame 0 is an ASCII kind tag,
frame 1 a protobuf header, then one raw frame per numpy array, in the order the header lists them.
Arrays travel as raw little-endian bytes (zero-copy on send); nothing here is pickled. numpy only:
the scheduler side must never import torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields

import numpy as np

from tandem.v1 import engine_pb2 as pb

PROTOCOL_VERSION = 4  # 2: incremental plans over row slots held by the worker; 3: penalties, logit bias, min_tokens;
# 4: a plan's empty arrays stay off the wire

KIND_HELLO = b"HELLO"
KIND_PLAN = b"PLAN"
KIND_FLUSH = b"FLUSH"
KIND_RESULT = b"RESULT"
KIND_REFUSED = b"REFUSED"
KIND_RESET = b"RESET"
KIND_BYE = b"BYE"
KIND_REJECT = b"REJECT"
# Structured output: constraints compiled by the worker off its step loop (engine.proto).
KIND_COMPILE = b"COMPILE"
KIND_COMPILED = b"COMPILED"
KIND_RELEASE = b"RELEASE"
KINDS = (KIND_HELLO, KIND_PLAN, KIND_FLUSH, KIND_RESULT, KIND_REFUSED, KIND_RESET, KIND_BYE, KIND_REJECT,
         KIND_COMPILE, KIND_COMPILED, KIND_RELEASE)

# Debug mode (`--debug-placeholders`): a carry-over placeholder is this sentinel instead of 0, so a
# placeholder that reaches the embedding unresolved cannot pass for a real token.
PLACEHOLDER_SENTINEL = -7

_ALLOWED_DTYPES = {"int8", "int32", "int64", "uint64", "float32", "float64"}
# Little-endian dtype objects by name: comparing dtype objects is far cheaper than `dtype.name`, which
# numpy rebuilds on every access (tens of arrays cross per step).
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _ALLOWED_DTYPES}
_NAME_OF = {dt: name for name, dt in _DTYPES.items()}
MAX_ARRAY_BYTES = 1 << 30


class WireError(ValueError):
    """A message that does not follow the protocol (garbage, truncated, wrong sizes)."""


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[list[pb.ArraySpec], list[memoryview]]:
    specs, frames = [], []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        dtype = _NAME_OF.get(arr.dtype)
        if dtype is None:
            raise WireError(f"array {name!r}: dtype {arr.dtype} not allowed on the wire")
        specs.append(pb.ArraySpec(name=name, dtype=dtype, shape=arr.shape))
        frames.append(memoryview(arr).cast("B"))
    return specs, frames


def unpack_arrays(specs, frames: list) -> dict[str, np.ndarray]:
    if len(specs) != len(frames):
        raise WireError(f"header lists {len(specs)} arrays, message carries {len(frames)}")
    out: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames, strict=True):
        dtype = _DTYPES.get(spec.dtype)
        if dtype is None:
            raise WireError(f"array {spec.name!r}: dtype {spec.dtype!r} not allowed")
        shape = tuple(spec.shape)
        if any(d < 0 for d in shape):
            raise WireError(f"array {spec.name!r}: negative dimension")
        count = math.prod(shape)
        buf = memoryview(frame)
        if count * dtype.itemsize != buf.nbytes or buf.nbytes > MAX_ARRAY_BYTES:
            raise WireError(
                f"array {spec.name!r}: {buf.nbytes} bytes for shape {list(spec.shape)} {spec.dtype}"
            )
        out[spec.name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


@dataclass
class Hello:
    """Worker -> scheduler handshake: model facts, KV capacity and step limits."""

    worker_id: str
    pid: int
    model_name: str
    vocab_size: int
    eos_token_ids: list[int]
    max_context: int
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    max_num_tokens: int
    max_num_rows: int
    max_blocks_per_row: int
    tokenizer_json: bytes
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool = False
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_min_p: float = 0.0
    instance_token: str = ""
    replace: bool = False
    tensor_parallel_size: int = 1
    grammar_engine: str = ""
    protocol_version: int = PROTOCOL_VERSION

    def encode(self) -> list[bytes]:
        msg = pb.Hello(**{f.name: getattr(self, f.name) for f in fields(self)})
        return [KIND_HELLO, msg.SerializeToString()]

    @classmethod
    def from_header(cls, header: bytes) -> Hello:
        msg = pb.Hello.FromString(header)
        kw = {f.name: getattr(msg, f.name) for f in fields(cls)}
        kw["eos_token_ids"] = list(msg.eos_token_ids)
        return cls(**kw)


# The arrays of a StepPlan with their dtypes; the order is the frame order (see engine.proto).
PLAN_ARRAYS: dict[str, str] = {
    "free_slots": "int32",
    "new_slots": "int32",
    "new_context": "int32",
    "new_temperature": "float32",
    "new_top_p": "float32",
    "new_top_k": "int32",
    "new_min_p": "float32",
    "new_seed": "uint64",
    "new_num_logprobs": "int32",
    # Penalties, logit bias and min_tokens (worker_svc/penalties.py): per new slot, its scalars and
    # how many entries it has in the flat arrays below, which list the new slots' entries in order.
    "new_repetition_penalty": "float32",
    "new_presence_penalty": "float32",
    "new_frequency_penalty": "float32",
    "new_min_tokens": "int32",
    "new_prompt_len": "int32",
    "new_bias_count": "int32",
    "new_mask_count": "int32",
    "new_history_len": "int32",
    # Structured output: the new slot's constraint, an index into the header's grammar_keys (-1 = none).
    "new_grammar": "int32",
    "bias_ids": "int32",
    "bias_values": "float32",
    "mask_ids": "int32",
    "history": "int32",
    "append_slots": "int32",
    "append_blocks": "int32",
    "rows": "int32",
    "query_start": "int32",
    "input_ids": "int32",
    "carry_index": "int32",
    "sample": "int32",
}
_NEW_ARRAYS = tuple(name for name in PLAN_ARRAYS if name.startswith("new_"))
_ROW_ARRAYS = ("rows", "carry_index", "sample")
_FLAT_ARRAYS = ("bias_ids", "bias_values", "mask_ids", "history")  # entries of the new slots, in order
# The value of each per-new-slot penalty array that leaves sampling as it is.
_PENALTY_DEFAULTS = {
    "new_repetition_penalty": 1.0, "new_presence_penalty": 0.0, "new_frequency_penalty": 0.0,
    "new_min_tokens": 0, "new_prompt_len": 0, "new_bias_count": 0, "new_mask_count": 0, "new_history_len": 0,
    "new_grammar": -1,
}

def _none(dtype: str) -> np.ndarray:
    return np.zeros(0, dtype)


# A decoded plan's absent arrays: shared, which is safe for arrays with no element to write.
_EMPTY = {dtype: _none(dtype) for dtype in set(PLAN_ARRAYS.values())}


@dataclass
class StepPlan:
    """One step's changes to the worker's row slots plus the rows it runs (see engine.proto).

    Only `validate` (stateless shape and range checks) lives here; the checks against the worker's
    slot state (a new slot must be free, a row's context must fit its blocks) are the worker's.
    """

    step_id: int
    carry_from_step: int
    flush: bool
    rows: np.ndarray
    query_start: np.ndarray
    input_ids: np.ndarray
    carry_index: np.ndarray
    sample: np.ndarray
    free_slots: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_slots: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_context: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_temperature: np.ndarray = field(default_factory=lambda: _none("float32"))
    new_top_p: np.ndarray = field(default_factory=lambda: _none("float32"))
    new_top_k: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_min_p: np.ndarray = field(default_factory=lambda: _none("float32"))
    new_seed: np.ndarray = field(default_factory=lambda: _none("uint64"))
    new_num_logprobs: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_repetition_penalty: np.ndarray = field(default_factory=lambda: _none("float32"))
    new_presence_penalty: np.ndarray = field(default_factory=lambda: _none("float32"))
    new_frequency_penalty: np.ndarray = field(default_factory=lambda: _none("float32"))
    new_min_tokens: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_prompt_len: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_bias_count: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_mask_count: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_history_len: np.ndarray = field(default_factory=lambda: _none("int32"))
    new_grammar: np.ndarray = field(default_factory=lambda: _none("int32"))
    bias_ids: np.ndarray = field(default_factory=lambda: _none("int32"))
    bias_values: np.ndarray = field(default_factory=lambda: _none("float32"))
    mask_ids: np.ndarray = field(default_factory=lambda: _none("int32"))
    history: np.ndarray = field(default_factory=lambda: _none("int32"))
    append_slots: np.ndarray = field(default_factory=lambda: _none("int32"))
    append_blocks: np.ndarray = field(default_factory=lambda: _none("int32"))
    request_ids: str = ""  # new slot -> client request id, "\n"-joined (logs only; may be empty)
    check_state: bool = False  # debug: the worker returns its row-slot state digest
    grammar_keys: list[str] = field(default_factory=list)  # the compiled constraints new_grammar names

    def __post_init__(self) -> None:
        # A plan built without the penalty arrays (tests, benchmarks) starts its slots with them off.
        n = int(self.new_slots.shape[0])
        for name, off in _PENALTY_DEFAULTS.items():
            if n and getattr(self, name).shape[0] == 0:
                setattr(self, name, np.full(n, off, PLAN_ARRAYS[name]))

    def new_request_ids(self) -> list[str]:
        ids = self.request_ids.split("\n") if self.request_ids else []
        n = int(self.new_slots.shape[0])
        return ids if len(ids) == n else [""] * n

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def validate(self, max_tokens: int, max_rows: int, vocab_size: int) -> None:
        """Shape and range checks a worker runs before touching its state or buffers."""
        r, t = self.num_rows, self.num_tokens
        if not (0 < r <= max_rows and 0 < t <= max_tokens):
            raise WireError(f"step {self.step_id}: {r} rows / {t} tokens outside limits")
        for name, dtype in PLAN_ARRAYS.items():
            arr = getattr(self, name)
            if arr.dtype != _DTYPES[dtype] or arr.ndim != 1:
                raise WireError(f"{name}: {arr.ndim}-D {arr.dtype}, expected 1-D {dtype}")
        n = self.new_slots.shape[0]
        for name in _NEW_ARRAYS:
            if getattr(self, name).shape != (n,):
                raise WireError(f"{name}: shape {getattr(self, name).shape}, expected ({n},)")
        if not n and any(getattr(self, name).size for name in _FLAT_ARRAYS):
            raise WireError("bias_ids / bias_values / mask_ids / history: entries without a new slot")
        for name in _ROW_ARRAYS:
            if getattr(self, name).shape != (r,):
                raise WireError(f"{name}: shape {getattr(self, name).shape}, expected ({r},)")
        if self.append_blocks.shape != self.append_slots.shape:
            raise WireError("append_blocks and append_slots differ in length")
        if self.query_start.shape != (r + 1,):
            raise WireError("query_start: wrong shape")
        for name in ("free_slots", "new_slots", "append_slots", "rows"):
            arr = getattr(self, name)
            if arr.size and (arr.min() < 0 or arr.max() >= max_rows):
                raise WireError(f"{name}: slot outside [0, {max_rows})")
        for name in ("free_slots", "new_slots", "rows"):
            arr = getattr(self, name)
            if arr.size > 1 and np.bincount(arr).max() > 1:
                raise WireError(f"{name}: a slot listed twice")
        qs = self.query_start
        lens = np.diff(qs)
        if qs[0] != 0 or qs[-1] != t or lens.min() <= 0:
            raise WireError("query_start: not a strictly increasing 0..T range")
        ids = self.input_ids
        if ids.max() >= vocab_size:
            raise WireError("input_ids: token id outside the vocabulary")
        if ids.min() < 0:  # only the placeholder sentinel (debug mode) may be negative
            placeholder = ids == PLACEHOLDER_SENTINEL
            if np.any((ids < 0) & ~placeholder):
                raise WireError("input_ids: token id outside the vocabulary")
            # A sentinel may only sit at the first token of a row that carries over.
            carried = np.zeros(t, dtype=bool)
            carried[qs[:-1][self.carry_index >= 0]] = True
            if np.any(placeholder & ~carried):
                raise WireError("input_ids: placeholder sentinel at a position nothing carries into")
        if n:
            self._validate_penalties(vocab_size)
            g = self.new_grammar
            if g.min() < -1 or g.max() >= len(self.grammar_keys):
                raise WireError(f"new_grammar: index outside [-1, {len(self.grammar_keys)})")
        carries = self.carry_index >= 0
        if self.carry_from_step < 0 and carries.any():
            raise WireError("carry_index set but carry_from_step is -1")
        if lens.max() > 1 and np.any(carries & (lens != 1)):
            raise WireError("carry_index set on a row of several tokens")

    def _validate_penalties(self, vocab_size: int) -> None:
        """The new slots' penalty scalars in range, and their flat lists as long as their counts say."""
        rep, pres, freq = self.new_repetition_penalty, self.new_presence_penalty, self.new_frequency_penalty
        if not (np.all(np.isfinite(rep) & (rep > 0)) and np.all(np.isfinite(pres)) and np.all(np.isfinite(freq))):
            raise WireError("penalty out of range")
        for count, flat in (("new_bias_count", "bias_ids"), ("new_bias_count", "bias_values"),
                            ("new_mask_count", "mask_ids"), ("new_history_len", "history")):
            c = getattr(self, count)
            if np.any(c < 0) or int(c.sum()) != getattr(self, flat).shape[0]:
                raise WireError(f"{flat}: {getattr(self, flat).shape[0]} entries, {count} sums to {int(c.sum())}")
        if np.any(self.new_min_tokens < 0) or np.any(self.new_prompt_len < 0):
            raise WireError("new_min_tokens / new_prompt_len: negative")
        if np.any((self.new_history_len > 0) & (self.new_history_len < self.new_prompt_len)):
            raise WireError("new_history_len: shorter than the prompt")
        for name in ("bias_ids", "mask_ids", "history"):
            ids = getattr(self, name)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise WireError(f"{name}: token id outside the vocabulary")
        if not np.all(np.isfinite(self.bias_values)):
            raise WireError("bias_values: not finite")

    def encode(self) -> list:
        # Empty arrays are left out (a steady decode step has some twenty): the receiver fills them in.
        specs, frames = pack_arrays({name: arr for name in PLAN_ARRAYS if (arr := getattr(self, name)).size})
        header = pb.StepPlanHeader(
            step_id=self.step_id, carry_from_step=self.carry_from_step, flush=self.flush, arrays=specs,
            request_ids=self.request_ids, check_state=self.check_state, grammar_keys=self.grammar_keys,
        )
        return [KIND_PLAN, header.SerializeToString(), *frames]

    @classmethod
    def decode(cls, header: bytes, frames: list) -> StepPlan:
        msg = pb.StepPlanHeader.FromString(header)
        arrays = unpack_arrays(msg.arrays, frames)
        names = iter(PLAN_ARRAYS)
        if len(arrays) != len(msg.arrays) or not all(name in names for name in arrays):  # in order, once each
            raise WireError(f"plan arrays {list(arrays)}: not a subsequence of {list(PLAN_ARRAYS)}")
        for name in PLAN_ARRAYS:
            if name not in arrays:
                arrays[name] = _EMPTY[PLAN_ARRAYS[name]]
        return cls(step_id=msg.step_id, carry_from_step=msg.carry_from_step, flush=msg.flush, **arrays,
                   request_ids=msg.request_ids, check_state=msg.check_state, grammar_keys=list(msg.grammar_keys))


def state_digest(slots: np.ndarray, context: np.ndarray, num_blocks: np.ndarray, blocks: np.ndarray) -> int:
    """The digest both sides compute of the row-slot state (debug check): per active slot, ascending,
    its context length and block count, then every block id in slot and column order. Never 0."""
    h = hashlib.blake2b(digest_size=8)
    for arr in (slots, context, num_blocks, blocks):
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return int.from_bytes(h.digest(), "little") or 1


@dataclass
class StepResult:
    """One step's outputs: a sampled token per row (-1 where the row did not sample), timings."""

    step_id: int
    sampled: np.ndarray  # int32 [R]
    compute_ms: float = 0.0
    idle_gap_ms: float = 0.0
    state_digest: int = 0  # state_digest() of the worker's row slots, when the plan asked (check_state)
    logprob: np.ndarray | None = None  # float32 [R]
    top_ids: np.ndarray | None = None  # int32 [R, K]
    top_logprobs: np.ndarray | None = None  # float32 [R, K]
    grammar_ms: float = 0.0  # host time advancing matchers and filling masks for this step
    extra: dict = field(default_factory=dict)

    def encode(self) -> list:
        arrays = {"sampled": self.sampled}
        for name in ("logprob", "top_ids", "top_logprobs"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        specs, frames = pack_arrays(arrays)
        header = pb.StepResultHeader(
            step_id=self.step_id, compute_ms=self.compute_ms, idle_gap_ms=self.idle_gap_ms, arrays=specs,
            state_digest=self.state_digest, grammar_ms=self.grammar_ms,
        )
        return [KIND_RESULT, header.SerializeToString(), *frames]

    @classmethod
    def decode(cls, header: bytes, frames: list) -> StepResult:
        msg = pb.StepResultHeader.FromString(header)
        arrays = unpack_arrays(msg.arrays, frames)
        if "sampled" not in arrays or arrays["sampled"].ndim != 1:
            raise WireError("result without a 1-D `sampled` array")
        return cls(
            step_id=msg.step_id,
            sampled=arrays["sampled"],
            compute_ms=msg.compute_ms,
            idle_gap_ms=msg.idle_gap_ms,
            state_digest=msg.state_digest,
            grammar_ms=msg.grammar_ms,
            logprob=arrays.get("logprob"),
            top_ids=arrays.get("top_ids"),
            top_logprobs=arrays.get("top_logprobs"),
        )


def flush_message() -> list[bytes]:
    return [KIND_FLUSH, pb.Flush().SerializeToString()]


def refused_message(step_id: int, reason: str) -> list[bytes]:
    return [KIND_REFUSED, pb.Refused(step_id=step_id, reason=reason[:1000]).SerializeToString()]


def reset_message() -> list[bytes]:
    return [KIND_RESET, pb.Reset().SerializeToString()]


def bye_message(replaced: bool = False, reason: str = "") -> list[bytes]:
    return [KIND_BYE, pb.Bye(replaced=replaced, reason=reason[:1000]).SerializeToString()]


def decode_bye(header: bytes) -> tuple[bool, str]:
    """(replaced, reason); an unreadable BYE is an orderly shutdown."""
    try:
        msg = pb.Bye.FromString(header)
    except Exception:  # protobuf DecodeError
        return False, ""
    return msg.replaced, msg.reason


def reject_message(reason: str, final: bool = False) -> list[bytes]:
    return [KIND_REJECT, pb.Reject(reason=reason[:1000], final=final).SerializeToString()]


def decode_reject(header: bytes) -> tuple[str, bool]:
    """(reason, final)."""
    try:
        msg = pb.Reject.FromString(header)
    except Exception:  # protobuf DecodeError: a reason we cannot read is still a refusal
        return "(unreadable reason)", False
    return msg.reason, msg.final


def _parse(message_type, header: bytes, kind: bytes):
    """`header` as a `message_type`; a header that is not one is a WireError, never a crash."""
    try:
        return message_type.FromString(header)
    except Exception as exc:  # protobuf DecodeError
        raise WireError(f"undecodable {kind.decode()}: {exc}") from exc


def decode_refused(header: bytes) -> tuple[int, str]:
    msg = _parse(pb.Refused, header, KIND_REFUSED)
    return msg.step_id, msg.reason


def compile_message(specs: list[tuple[str, str, str]]) -> list[bytes]:
    """COMPILE for (key, kind, spec) triples."""
    msg = pb.Compile(grammars=[pb.GrammarSpec(key=k, kind=kind, spec=spec) for k, kind, spec in specs])
    return [KIND_COMPILE, msg.SerializeToString()]


def decode_compile(header: bytes) -> list[tuple[str, str, str]]:
    return [(g.key, g.kind, g.spec) for g in _parse(pb.Compile, header, KIND_COMPILE).grammars]


def compiled_message(key: str, ok: bool, message: str = "", compile_ms: float = 0.0) -> list[bytes]:
    msg = pb.Compiled(key=key, ok=ok, message=message[:2000], compile_ms=compile_ms)
    return [KIND_COMPILED, msg.SerializeToString()]


def decode_compiled(header: bytes) -> tuple[str, bool, str, float]:
    """(key, ok, the compiler's message, compile_ms)."""
    msg = _parse(pb.Compiled, header, KIND_COMPILED)
    return msg.key, msg.ok, msg.message, msg.compile_ms


def release_message(keys: list[str]) -> list[bytes]:
    return [KIND_RELEASE, pb.Release(keys=keys).SerializeToString()]


def decode_release(header: bytes) -> list[str]:
    return list(_parse(pb.Release, header, KIND_RELEASE).keys)


def split(frames: list) -> tuple[bytes, bytes, list]:
    """Splits a received multipart message into (kind, header, array frames); rejects garbage."""
    if len(frames) < 2:
        raise WireError(f"message of {len(frames)} frames; at least kind and header expected")
    kind = bytes(frames[0])
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind[:16]!r}")
    return kind, bytes(frames[1]), list(frames[2:])
