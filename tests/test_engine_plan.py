"""How a GPU engine starts (functions/engine_plan.py) and the streaming weight loader (functions/weights.py).

The plan is pure: table tests. The loader's reading half runs here on the CPU against safetensors' own reader
(its GPU half, and a whole engine started on it, run in tests/test_gpu.py on the GPU host).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from thaw.functions.engine_plan import WORKER_EXTENSION, arch_id, ensure_view, gpu_plan, kv_cache_bytes
from thaw.functions.weights import (HostCopy, PinnedRing, fast_load_problem, piece_cuts, read_index,
                                    stream_weights)

GiB = 1 << 30
LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_size": 4096, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("config, dtype, seqs, length, room, expected", [
    # 8B: 128 KiB a token; 16 sequences of 4096 tokens = 8 GiB
    (LLAMA_8B, "auto", 16, 4096, 100 * GiB, 8 * GiB),
    (LLAMA_8B, "float32", 16, 4096, 100 * GiB, 16 * GiB),
    # no max_model_len: the model's own context (131072 tokens), which here does not fit: vLLM profiles
    (LLAMA_8B, "auto", 16, None, 100 * GiB, None),
    (LLAMA_8B, "auto", 1, None, 100 * GiB, 16 * GiB),
    # an unbounded batch, an unknown room, or a config without the sizes: vLLM profiles
    (LLAMA_8B, "auto", None, 4096, 100 * GiB, None),
    (LLAMA_8B, "auto", 16, 4096, None, None),
    ({"num_hidden_layers": 2}, "auto", 16, 4096, 100 * GiB, None),
    # head_dim from hidden_size, KV heads from attention heads; rounded up to 2 MiB
    ({"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 128}, "float16", 1, 16, GiB, 2 << 20),
])
def test_kv_cache_is_sized_for_the_replicas_batch(config, dtype, seqs, length, room, expected):
    assert kv_cache_bytes(config, dtype, seqs, length, room) == expected


@pytest.mark.parametrize("engine, problem, total, expected_kwargs, streams", [
    # unquantized safetensors: dummy weights from the view, the tokenizer from the weights; KV for the batch
    ({"max_num_seqs": 16, "max_model_len": 4096, "gpu_memory_utilization": 0.9}, None, 140 * GiB,
     {"worker_extension_cls": WORKER_EXTENSION, "load_format": "dummy", "model": "/views/a", "tokenizer": "/w",
      "kv_cache_memory_bytes": 8 * GiB}, True),
    # a quantized checkpoint: vLLM's own loader; no GPU figures: vLLM's profiling
    ({"max_num_seqs": 16, "max_model_len": 4096}, "a quantized checkpoint", None,
     {"worker_extension_cls": WORKER_EXTENSION}, False),
    # the KV cache would not fit the share left after the weights: vLLM's profiling
    ({"max_num_seqs": 256, "max_model_len": 4096, "gpu_memory_utilization": 0.3}, None, 140 * GiB,
     {"worker_extension_cls": WORKER_EXTENSION, "load_format": "dummy", "model": "/views/a", "tokenizer": "/w"}, True),
    # what the spec sets stays
    ({"max_num_seqs": 16, "max_model_len": 4096, "kv_cache_memory_bytes": GiB}, None, 140 * GiB,
     {"worker_extension_cls": WORKER_EXTENSION, "load_format": "dummy", "model": "/views/a", "tokenizer": "/w"}, True),
])
def test_gpu_plan(engine, problem, total, expected_kwargs, streams):
    from pathlib import Path

    plan = gpu_plan(engine, Path("/w"), Path("/views/a"), problem, LLAMA_8B, 16 * GiB, total)
    assert plan.kwargs == expected_kwargs and plan.stream_weights == streams


def test_weights_versions_of_one_architecture_share_a_view(tiny_model, tmp_path):
    """New weights of the same architecture and configuration: the same view, so the same compile cache."""
    other = tmp_path / "v2"
    shutil.copytree(tiny_model, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(other / "model.safetensors"))
    assert arch_id(other) == arch_id(tiny_model)
    view = ensure_view(tmp_path / "views", tiny_model)
    assert ensure_view(tmp_path / "views", other) == view
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "generation_config.json"]
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert arch_id(other) != arch_id(tiny_model)


def test_streamed_weights_equal_safetensors_own_reader(tiny_model, tmp_path):
    # Tiny chunks and few slots: tensors span chunks, and slots are reused many times over.
    tensors = {"a": torch.arange(1000, dtype=torch.float32).reshape(10, 100), "empty": torch.zeros(0),
               "b": torch.randn(7, 3).to(torch.bfloat16), "c": torch.tensor(3, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for folder in (tiny_model, tmp_path):
        expected = load_file(str(next(folder.glob("*.safetensors"))))
        for readers in (1, 2, 3):  # one reader per slot, or fewer: chunks read ahead of the device copy
            ring = PinnedRing(chunk_bytes=1000, slots=3, pinned=False, readers=readers)
            got = dict(stream_weights(read_index(folder), "cpu", ring))
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (name, readers)


@pytest.mark.parametrize("environ, ring", [
    ({}, (16 << 20, 24, 12)),  # the defaults: 12 readers, 24 slots of 16 MiB
    ({"THAW_WEIGHTS_READERS": "2", "THAW_WEIGHTS_SLOTS": "3", "THAW_WEIGHTS_CHUNK_MIB": "1"}, (1 << 20, 3, 2)),
    ({"THAW_WEIGHTS_READERS": "6", "THAW_WEIGHTS_SLOTS": "4", "THAW_WEIGHTS_CHUNK_MIB": " 1 "}, (1 << 20, 4, 4)),
    ({"THAW_WEIGHTS_SLOTS": "2", "THAW_WEIGHTS_CHUNK_MIB": "1", "THAW_WEIGHTS_READERS": ""}, (1 << 20, 2, 2)),
])
def test_the_weights_ring_is_set_from_the_environment(environ, ring):
    """A node tuned by `thaw bench gpu --parts stream` sets its ring in the environment; never more readers than
    slots (a reader waits on its slot)."""
    got = PinnedRing.configured(pinned=False, environ=environ)
    assert (got.chunk_bytes, len(got.slots), got.readers) == ring


@pytest.mark.parametrize("value", ["0", "-1", "eight", "1.5"])
def test_a_ring_setting_that_is_no_positive_whole_number_is_refused_by_name(value):
    with pytest.raises(ValueError, match="THAW_WEIGHTS_READERS"):
        PinnedRing.configured(pinned=False, environ={"THAW_WEIGHTS_READERS": value})


def test_weights_stream_from_a_host_copy_whole_partial_or_released(tiny_model, tmp_path):
    """A parked replica's wake streams from its host copy; a copy still being built serves the tensors it has
    and the files the rest. Several files, a tensor spanning pieces, an empty tensor (pinned on a GPU host)."""
    save_file({"a": torch.arange(1000, dtype=torch.float32).reshape(10, 100), "empty": torch.zeros(0)},
              str(tmp_path / "model-00001.safetensors"))
    save_file({"b": torch.randn(7, 3).to(torch.bfloat16), "c": torch.tensor(3, dtype=torch.int64)},
              str(tmp_path / "model-00002.safetensors"))
    for folder in (tiny_model, tmp_path):
        entries = read_index(folder)
        expected = {}
        for path in sorted(folder.glob("*.safetensors")):
            expected.update(load_file(str(path)))
        copy = HostCopy(entries, pinned=False, piece_bytes=1500)
        assert copy.size == sum(e.end - e.start for e in entries) and not copy.complete
        ring = PinnedRing(chunk_bytes=1000, slots=3, pinned=False)
        steps = 0
        while True:  # a stream at every step of the build
            got = dict(stream_weights(entries, "cpu", ring, copy))
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (name, copy.filled)
            del got
            if copy.complete:
                break
            left = copy.fill_next()
            steps += 1
            assert left == copy.size - copy.filled
        assert steps == -(-copy.size // 1500)  # one piece at a time
        assert all(copy.has(e) for e in entries)
        assert copy.release() == copy.size and not any(copy.has(e) for e in entries if e.end > e.start)


@pytest.mark.parametrize("start, length, piece, cuts", [
    (0, 0, 100, []),
    (10, 50, 100, [(10, 60)]),
    (0, 100, 100, [(0, 100)]),
    (90, 20, 100, [(90, 100), (100, 110)]),  # a tensor across a boundary: one copy per piece (CUDA wants that)
    (50, 250, 100, [(50, 100), (100, 200), (200, 300)]),
])
def test_a_copy_out_of_the_host_copy_never_spans_two_pinned_pieces(start, length, piece, cuts):
    assert piece_cuts(start, length, piece) == cuts


def test_segments_of_a_tensor_lie_each_in_one_piece(tmp_path):
    save_file({"a": torch.arange(1000, dtype=torch.float32).reshape(10, 100)}, str(tmp_path / "m.safetensors"))
    entries = read_index(tmp_path)
    copy = HostCopy(entries, pinned=False, piece_bytes=1500)
    while copy.fill_next():
        pass
    parts = copy.segments(entries[0])
    assert [off for off, _ in parts] == [0, 1500, 3000] and sum(p.numel() for _, p in parts) == 4000
    copy.release()


def test_what_streams_and_what_is_left_to_vllms_loader(tiny_model, tmp_path):
    assert fast_load_problem(tiny_model) is None
    quantized = tmp_path / "q"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    assert fast_load_problem(quantized) == "a quantized checkpoint"
    assert fast_load_problem(tmp_path / "missing").startswith("no readable config.json")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    assert fast_load_problem(tmp_path / "bin") == "no safetensors files"
    truncated = tmp_path / "t"
    shutil.copytree(tiny_model, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EOFError):
        list(stream_weights(read_index(truncated), "cpu", PinnedRing(chunk_bytes=1 << 16, slots=2, pinned=False)))


# vLLM's worker across the versions the `gpu` extra allows. Only one CUDA build runs on the GPU host (0.26), so
# the newer workers' shapes stand in here, as their source has them: the sleep-mode backend a method
# (`_get_sleep_mode_backend`, 0.26-0.29), then a property (`sleep_mode_backend`, 0.30 on); without either, the
# allocator itself.
class _Backend:
    def __init__(self, calls: list):
        self.calls = calls

    def suspend(self, level: int) -> None:
        self.calls.append(("backend", level))


class _WorkerWithMethod:
    def __init__(self):
        self.calls = []

    def _get_sleep_mode_backend(self):
        return _Backend(self.calls)


class _WorkerWithProperty:
    def __init__(self):
        self.calls = []

    @property
    def sleep_mode_backend(self):
        return _Backend(self.calls)


@pytest.mark.parametrize("worker_class", [_WorkerWithMethod, _WorkerWithProperty])
def test_a_sleep_goes_through_the_workers_own_sleep_mode_backend_in_every_vllm(worker_class):
    from thaw.functions.worker_ext import suspend_level_2

    worker = worker_class()
    suspend_level_2(worker)
    # the backend keeps what its vLLM must keep across a sleep (from 0.30: the runtime and CUDA graph pools)
    assert worker.calls == [("backend", 2)]
