"""One step ahead (async scheduling) changes when the host learns each token, never which token: the same
requests give the same tokens, text and finish reasons with it on as off, through stop strings, stop ids,
EOS, n > 1, logprobs, penalties, preemption and aborts; and no KV block stays held, or cached under a
placeholder id, afterwards."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.sampling_types import DeferredSample

PROMPTS = ["The quick brown fox jumps over the lazy dog near the old river bank.",
           "Once upon a time there was a lighthouse",
           "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z and then the",
           "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30"]


def _engine(async_on: bool, **kw) -> LLMEngine:
    engine = LLMEngine(EngineConfig(device="numpy", max_model_len=256, seed=1, async_scheduling=async_on, **kw))
    engine.deferred = 0
    real = engine.runner.execute

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        engine.deferred += isinstance(out, DeferredSample)
        return out
    engine.runner.execute = counting
    return engine


def _run(engine, requests, abort=None) -> dict:
    """requests: (id, prompt, params). abort: (request id, after this many steps). Returns per request
    and choice: (token ids, text, finish reason, stop reason), from the streamed deltas."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                ids, text, _, _ = got.get((out.request_id, o.index), ((), "", None, None))
                got[out.request_id, o.index] = (ids + tuple(o.token_ids), text + o.text, o.finish_reason,
                                                o.stop_reason)
        steps += 1
        if abort and steps == abort[1]:
            engine.abort(abort[0])
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # nothing held after the last request
    assert all(-1 not in tokens for tokens in bm.block_tokens if tokens)  # nothing cached under a placeholder
    return got


def _requests(stop_id: int, stop: str, eos: int) -> list:
    seeded = dict(temperature=1.0, ignore_eos=True)
    return [
        ("greedy", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
        ("stop-string", PROMPTS[1], SamplingParams(**seeded, seed=5, max_tokens=40, stop=[stop])),
        ("stop-id", PROMPTS[0], SamplingParams(**seeded, seed=3, max_tokens=30, stop_token_ids=[stop_id])),
        ("n2", PROMPTS[2], SamplingParams(**seeded, seed=7, n=2, max_tokens=25)),
        ("eos", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=5, logit_bias={eos: 100.0})),
        ("logprobs", PROMPTS[1], SamplingParams(**seeded, seed=9, max_tokens=8, logprobs=2)),
        ("penalty", PROMPTS[2], SamplingParams(**seeded, seed=11, max_tokens=12, repetition_penalty=1.3)),
        ("long", PROMPTS[3], SamplingParams(**seeded, seed=13, max_tokens=60)),
    ]


@pytest.mark.parametrize("cfg", [dict(max_num_seqs=8), dict(max_num_seqs=8, num_kv_blocks=16)],
                         ids=["roomy", "preempting"])
def test_one_step_ahead_gives_the_same_outputs(cfg):
    sync, ahead = _engine(False, **cfg), _engine(True, **cfg)
    stop_id = sync.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=3, max_tokens=30,
                                                         ignore_eos=True))[0].outputs[0].token_ids[6]
    text = sync.generate([PROMPTS[1]], SamplingParams(temperature=1.0, seed=5, max_tokens=40))[0].outputs[0].text
    requests = _requests(stop_id, text[len(text) // 2:len(text) // 2 + 3], sync.tokenizer.eos_token_id)
    want, got = _run(sync, requests), _run(ahead, requests)
    assert got == want
    assert {rid: want[rid, 0][2] for rid, _, _ in requests} == {
        "greedy": "length", "stop-string": "stop", "stop-id": "stop", "n2": "length", "eos": "stop",
        "logprobs": "length", "penalty": "length", "long": "length"}
    assert sync.deferred == 0 and ahead.deferred > 20  # it did run ahead, most decode steps
    if "num_kv_blocks" in cfg:
        assert sync.scheduler.num_preemptions > 0 and ahead.scheduler.num_preemptions > 0


def test_abort_while_a_step_is_in_flight():
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=30, ignore_eos=True)
    requests = [("kept", PROMPTS[0], params), ("dropped", PROMPTS[1], params)]
    want = _run(_engine(False, max_num_seqs=4), requests[:1])
    ahead = _engine(True, max_num_seqs=4)
    got = _run(ahead, requests, abort=("dropped", 6))
    assert got["kept", 0] == want["kept", 0]
    assert len(got["dropped", 0][0]) < 30 and ahead._in_flight is None
