"""Tensor parallelism in the engine on the numpy backend (issue #15): LLMEngine with tensor_parallel_size 2 and 4
(rank 0 in this process, the other ranks as worker processes) generates the same greedy tokens as one rank, on
four dense families (sliding window and tied embeddings among them) and the three mixtures of experts (Mixtral,
Qwen2-MoE with its shared expert, Qwen3-MoE), with chunked prefill, one step ahead, logprobs and prompt logprobs;
dummy weights shard to the same model. A worker killed with SIGKILL fails the next step with RankFailedError naming
it; close(), the end of the interpreter and Ctrl-C leave no process. What tensor parallelism does not cover
(speculation, fp8, shapes that do not split, an expert's size included) is refused by name before any process
starts."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.config import ConfigError, EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tp_workers import RankFailedError
from tests.conftest import VOCAB
from tests.test_benchmark import TINY
from tests.test_tp_workers import REPO, _assert_gone


def _engine(path: str, world: int, **kw) -> LLMEngine:
    kw = {"device": "numpy", "max_model_len": 256, "max_num_seqs": 8, **kw}
    return LLMEngine(EngineConfig(model=path, tensor_parallel_size=world, **kw))


def _with_config(path: str, into, **changes) -> None:
    """A copy of checkpoint `path` in `into` (its files linked) whose config.json has `changes`."""
    for name in os.listdir(path):
        if name != "config.json":
            os.symlink(os.path.join(path, name), into / name)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    (into / "config.json").write_text(json.dumps({**raw, **changes}))


def _generate(path: str, world: int, prompts, params, **kw):
    engine = _engine(path, world, **kw)
    try:
        pids = engine.runner.ranks.group.pids if engine.runner.ranks is not None else []
        assert len(pids) == world - 1 and all(p != os.getpid() for p in pids)
        return engine.generate(prompts, params), pids
    finally:
        engine.close()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ["qwen2_untied", "llama3_scaled", "qwen3", "mistral_window", "mixtral", "qwen2_moe",
                                  "qwen3_moe"])
def test_greedy_tokens_equal_one_rank(checkpoint, rng, arch, world):
    path, _ = checkpoint(arch)
    # prompts longer than mistral_window's window of 40, and a token budget that chunks them and mixes steps
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 70, 23)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = {"max_num_batched_tokens": 32, "async_scheduling": True}
    want, _ = _generate(path, 1, prompts, params, **kw)
    got, pids = _generate(path, world, prompts, params, **kw)
    for i, (ours, ref) in enumerate(zip(got, want)):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids, f"{arch} x{world}, prompt {i}"
        assert len(ours.outputs[0].token_ids) == 16
    _assert_gone(pids)


def test_logprobs_and_prompt_logprobs_equal_one_rank(checkpoint, rng):
    path, _ = checkpoint("qwen2_tied")
    prompts = [rng.integers(0, VOCAB, 30).tolist(), rng.integers(0, VOCAB, 9).tolist()]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    (want, _), (got, _) = (_generate(path, w, prompts, params) for w in (1, 2))
    for ours, ref in zip(got, want):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        for (t, lp, top), (t2, lp2, top2) in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert t == t2 and abs(lp - lp2) < 1e-4 and [i for i, _ in top] == [i for i, _ in top2]
        assert len(ours.prompt_logprobs) == len(ref.prompt_logprobs)
        for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert a[0] == b[0] and abs(a[1] - b[1]) < 1e-4 and a[2] == b[2]


def test_dummy_weights_shard_to_the_same_model(tmp_path, rng):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    prompts = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (12, 3)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = {"load_format": "dummy", "skip_tokenizer_init": True, "seed": 7}
    (want, _), (got, _) = (_generate(str(tmp_path), w, prompts, params, **kw) for w in (1, 2))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_a_killed_rank_fails_the_next_step_by_name_and_close_leaves_nothing(checkpoint, rng):
    path, _ = checkpoint("qwen2_untied")
    engine = _engine(path, 4)
    pids = engine.runner.ranks.group.pids
    try:
        engine.generate([rng.integers(0, VOCAB, 10).tolist()], SamplingParams(temperature=0, max_tokens=3))
        os.kill(pids[2], signal.SIGKILL)  # rank 3
        engine.add_request("after", [1, 2, 3], SamplingParams(max_tokens=3))
        t = time.perf_counter()
        with pytest.raises(RankFailedError, match=f"rank 3 \\(pid {pids[2]}\\) stopped with exit code -9, killed by "
                                                  "SIGKILL"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.perf_counter() - t < 10
    finally:
        engine.close()
    _assert_gone(pids)


_SCRIPT = """
import sys, time
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
if __name__ == "__main__":
    engine = LLMEngine(EngineConfig(model={path!r}, device="numpy", tensor_parallel_size=2, max_model_len=128))
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    print(" ".join(map(str, engine.runner.ranks.group.pids)), flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "ctrl-c"])
def test_no_process_outlives_the_engine_without_close(checkpoint, tmp_path, how):
    """An engine never closed: the interpreter's end, or Ctrl-C (SIGINT to the process group, workers included,
    as a terminal sends it), stops its workers."""
    path, _ = checkpoint("qwen2_untied")
    script = tmp_path / "engine_script.py"
    script.write_text(_SCRIPT.format(path=path))
    proc = subprocess.Popen([sys.executable, str(script), "wait" if how == "ctrl-c" else "exit"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1, proc.stderr.read() if proc.poll() is not None else "no pids"
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        _assert_gone(pids)
    finally:
        proc.kill()
        proc.wait()


def test_what_tensor_parallelism_does_not_cover_is_refused_before_any_process_starts(checkpoint):
    path, _ = checkpoint("qwen2_untied")  # 4 query heads, 2 KV heads
    cases = [({"tensor_parallel_size": 3}, "over 3 ranks needs num_attention_heads divisible by 3; it is 4"),
             ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
              "speculative decoding with tensor_parallel_size 2 is not implemented yet"),
             ({"quantization": "fp8"}, "fp8 weights or KV cache with tensor_parallel_size 2"),
             ({"kv_cache_dtype": "fp8"}, "fp8 weights or KV cache with tensor_parallel_size 2")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            _engine(path, kw.pop("tensor_parallel_size", 2), **kw)
        assert not multiprocessing.active_children()
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer, got 0"):
        EngineConfig(tensor_parallel_size=0)


def test_a_mixture_of_experts_expert_size_that_does_not_split_is_refused_by_name(checkpoint, tmp_path):
    """The tiny Qwen3-MoE checkpoint with config.json's moe_intermediate_size 64 made 66: every other dimension
    splits over 4 ranks, the experts' does not."""
    path, _ = checkpoint("qwen3_moe")
    _with_config(path, tmp_path, moe_intermediate_size=66)
    with pytest.raises(ConfigError, match="over 4 ranks needs moe_intermediate_size divisible by 4; it is 66"):
        _engine(str(tmp_path), 4)
    assert not multiprocessing.active_children()


def test_a_start_up_that_fails_after_the_ranks_started_leaves_no_process(checkpoint):
    """The KV cache is sized after every rank has loaded its shard: a cache too small for one sequence fails the
    engine by name, and the ranks already running stop with it (not only at the interpreter's exit)."""
    path, _ = checkpoint("qwen2_untied")
    for world in (1, 2):
        with pytest.raises(ConfigError, match="the KV cache holds 2 blocks .32 tokens., fewer than one sequence of "
                                              "max_model_len 256"):
            _engine(path, world, num_kv_blocks=2)
        assert not multiprocessing.active_children()


def test_one_rank_config_changes_nothing(checkpoint):
    path, _ = checkpoint("qwen2_untied")
    engine = _engine(path, 1)
    assert engine.runner.ranks is None and engine.runner.tp is None
    assert np.asarray(engine.runner.kv_cache).shape[3] == 2  # both KV heads
    engine.close()


def test_a_rank_shape_the_backend_cannot_run_is_refused_at_start_up_and_leaves_no_process(checkpoint, tmp_path,
                                                                                       monkeypatch):
    """CUDA's grouped GEMM needs expert rows of a multiple of 8 halves (ops.moe_layout.moe_shape_problem, what
    CudaBackend.unsupported answers). moe_intermediate_size 72 splits over 2 ranks, but into 36: the start-up says so,
    before any weight moves, and the rank already started stops. The numpy backend is given CUDA's rule here."""
    from ops.backend import NumpyBackend
    from ops.cuda_shapes import cuda_shape_problem

    monkeypatch.setattr(NumpyBackend, "unsupported", lambda self, c: cuda_shape_problem(c))
    path, _ = checkpoint("qwen3_moe")
    _with_config(path, tmp_path, moe_intermediate_size=72)
    with pytest.raises(ConfigError, match=r"the numpy backend cannot run this model \(one rank's part of 2\): hidden "
                                          "size 128 and expert intermediate size 36 must be multiples of 8"):
        _engine(str(tmp_path), 2)
    assert not multiprocessing.active_children()
    _engine(path, 2).close()  # 64 splits into 32: runs
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("head_dim,refused", [(80, False), (72, True), (256, True)])
def test_a_head_size_the_attention_kernels_cannot_run_is_refused_at_start_up(checkpoint, tmp_path, monkeypatch,
                                                                            head_dim, refused):
    """The CUDA attention kernels take head_dim a multiple of 16 up to 128 (ops.cuda_shapes, what
    CudaBackend.unsupported answers): 80 passes the check and a head_dim-80 checkpoint serves; 72 and 256 are refused
    by name before any weight moves (the checkpoint's projections are shaped for 32: loading them would fail later,
    with a weights error). The numpy backend is given CUDA's rule here."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from ops.backend import NumpyBackend
    from ops.cuda_shapes import cuda_shape_problem

    monkeypatch.setattr(NumpyBackend, "unsupported", lambda self, c: cuda_shape_problem(c))
    path, _ = checkpoint("qwen2_untied")
    _with_config(path, tmp_path, head_dim=head_dim)
    config = EngineConfig(model=str(tmp_path), device="numpy", max_model_len=64)
    if refused:
        with pytest.raises(ConfigError, match=rf"the numpy backend cannot run this model.*head_dim {head_dim}: the "
                                              "attention kernels take a multiple of 16 up to 128"):
            LLMEngine(config)
    else:  # past the shape check, the weights (shaped for head_dim 32) do not fit
        with pytest.raises(Exception) as e:
            LLMEngine(config)
        assert "head_dim" not in str(e.value) and not isinstance(e.value, ConfigError), e.value
        # a checkpoint made with that head size starts and runs under the rule (tests/test_parity.py: its logits)
        path, _ = checkpoint("llama_hd80")
        engine = LLMEngine(EngineConfig(model=path, device="numpy", max_model_len=64))
        out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 3
