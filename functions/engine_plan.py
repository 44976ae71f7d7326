"""How a replica's engine starts on a GPU: what thaw adds to the spec's engine arguments (pure decisions,
table-tested in tests/test_engine_plan.py, plus the small files they name).

- Weights: an unquantized safetensors checkpoint starts on vLLM's dummy weights, from a per-architecture
  view of the model (its config files only); the real weights stream in once the engine is built
  (functions/weights.py), near the host -> GPU copy floor. vLLM keys its compiled artifacts by the model's
  path among the rest of its configuration, so through the view every weights version of one architecture
  and engine configuration finds the artifacts the first one compiled.
- KV cache: sized for what the replica can be asked at once (max_num_seqs sequences of max_model_len
  tokens) instead of the whole share of the GPU, so vLLM skips its profiling pass, a wake maps only that
  much memory, and more models fit on one GPU.
- The worker gets thaw's extension (functions/worker_ext.py): the streaming load, host buffers reserved
  for the first park, and hibernation of a parked engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

WORKER_EXTENSION = "thaw.functions.worker_ext.ThawWorker"
VIEW_FILES = ("config.json", "generation_config.json")  # what vLLM reads from `model` (the tokenizer is separate)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def arch_id(model_dir: str | Path) -> str:
    """Names an architecture: the bytes of the files vLLM builds the model from (not the weights)."""
    digest = hashlib.sha256()
    for name in VIEW_FILES:
        path = Path(model_dir) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"") + b"\0")
    return digest.hexdigest()[:32]


# what a tokenizer is made of: an engine adopted by another model keeps the tokenizer it was built with
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def engine_key(model_dir: str | Path, engine_args: dict) -> str:
    """Which built engines a model can adopt (functions/pool.py): same architecture view, same tokenizer, same
    engine configuration; the weights are the model's own."""
    digest = hashlib.sha256(arch_id(model_dir).encode())
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"") + b"\0")
    digest.update(json.dumps(engine_args, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def ensure_view(view_root: str | Path, model_dir: str | Path) -> Path:
    """The architecture's view (its config files) under `view_root`, made atomically on first use."""
    view = Path(view_root) / arch_id(model_dir)
    if view.is_dir():
        return view
    Path(view_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".view-", dir=view_root))
    for name in VIEW_FILES:
        if (Path(model_dir) / name).exists():
            shutil.copy2(Path(model_dir) / name, tmp / name)
    try:
        os.rename(tmp, view)
    except OSError:  # another replica made it first: the same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def kv_bytes_per_token(config: dict, dtype: str = "auto") -> int | None:
    """Bytes of KV cache one token takes in every layer (keys and values), for standard attention;
    None where the config does not say (vLLM then profiles)."""
    config = config.get("text_config", config)
    try:
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    if dtype == "auto":
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 2)


def kv_cache_bytes(config: dict, dtype: str, max_num_seqs: int | None, max_model_len: int | None,
                   room: int | None) -> int | None:
    """The KV cache for `max_num_seqs` sequences of `max_model_len` tokens, rounded up to 2 MiB; None
    (vLLM profiles and takes its share) when the batch is unbounded, a size is unknown, or it would not fit
    in `room` (the bytes of the replica's share left after its weights)."""
    per_token = kv_bytes_per_token(config, dtype)
    length = max_model_len or config.get("max_position_embeddings")
    if not (max_num_seqs and per_token and length and room):
        return None
    need = -(-max_num_seqs * int(length) * per_token // (2 << 20)) * (2 << 20)
    return need if need <= room else None


@dataclass(frozen=True)
class GpuPlan:
    kwargs: dict = field(default_factory=dict)  # added to vllm.EngineArgs
    stream_weights: bool = False  # the engine starts on dummy weights; the real ones stream in after
    notes: tuple[str, ...] = ()  # why a lever was not used, for the log


def gpu_plan(engine_kwargs: dict, model_dir: Path, view: Path | None, fast_problem: str | None, config: dict,
             weights_bytes: int, gpu_total: int | None) -> GpuPlan:
    """thaw's additions to a CUDA engine's arguments. Settings the spec gives are never overridden."""
    kwargs: dict = {"worker_extension_cls": WORKER_EXTENSION}
    notes = []
    stream = fast_problem is None and "load_format" not in engine_kwargs
    if stream:
        kwargs.update(load_format="dummy", model=str(view or model_dir), tokenizer=str(model_dir))
    else:
        notes.append(f"weights through vLLM's loader: {fast_problem or 'the spec sets load_format'}")
    if engine_kwargs.get("kv_cache_memory_bytes") is None:
        share = int(engine_kwargs.get("gpu_memory_utilization", 0.9) * gpu_total) if gpu_total else None
        room = share - weights_bytes - (2 << 30) if share else None  # 2 GiB: activations, graphs, context
        kv = kv_cache_bytes(config, engine_kwargs.get("dtype", "auto"), engine_kwargs.get("max_num_seqs"),
                            engine_kwargs.get("max_model_len"), room)
        if kv is None:
            notes.append("KV cache sized by vLLM's profiling (no bounded batch, or it would not fit)")
        else:
            kwargs["kv_cache_memory_bytes"] = kv
    return GpuPlan(kwargs, stream, tuple(notes))
