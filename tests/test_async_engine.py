"""AsyncLLMEngine: concurrent streams equal offline results, cancel aborts, errors reach the caller."""
from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncLLMEngine, EngineDeadError
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


@pytest.fixture
def engine():
    e = AsyncLLMEngine(LLMEngine(EngineConfig(device="numpy", max_model_len=256)))
    yield e
    e.shutdown()


async def _collect(engine, rid, prompt, params):
    text, ids = "", []
    async for out in engine.generate(rid, prompt, params):
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
    return text, ids, out.outputs[0].finish_reason


def test_concurrent_streams_match_offline(engine):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12 + s, ignore_eos=True) for s in range(4)]
    prompts = [f"prompt number {i} says hello" for i in range(4)]

    async def main():
        return await asyncio.gather(*(_collect(engine, f"r{i}", p, sp)
                                      for i, (p, sp) in enumerate(zip(prompts, params))))
    streamed = asyncio.run(main())
    offline = LLMEngine(EngineConfig(device="numpy", max_model_len=256)).generate(prompts, params)
    for (text, ids, reason), ref in zip(streamed, offline):
        assert ids == ref.outputs[0].token_ids and text == ref.outputs[0].text and reason == "length"


def test_cancel_aborts_and_frees_blocks(engine):
    async def main():
        agen = engine.generate("long", "a long request", SamplingParams(max_tokens=200, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()  # what a disconnecting client's handler does
        for _ in range(1000):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.005)
    asyncio.run(main())
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.block_manager.usage == 0.0


def test_bad_request_raises_to_the_caller_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await _collect(engine, "bad", [], SamplingParams())
        return await _collect(engine, "good", "hello", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(asyncio.run(main())[1]) == 3


def test_engine_death_fails_streams_and_later_requests(engine):
    def broken_step():
        raise RuntimeError("injected fault")
    engine.engine.step = broken_step

    async def main():
        with pytest.raises(EngineDeadError, match="injected fault"):
            await _collect(engine, "x", "hello", SamplingParams(max_tokens=3))
        assert engine.is_dead
        with pytest.raises(EngineDeadError):
            await _collect(engine, "y", "hello", SamplingParams(max_tokens=3))
    asyncio.run(main())
