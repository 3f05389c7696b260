"""Structured outputs through the GPU engine (issue #16), tiny checkpoint, temperature 1, seeded: every output
follows its constraint; one step ahead, where a constrained decode step launches its graph before the previous
step's ids have landed and samples after it with the late mask, gives the same tokens as the synchronous engine
(the same two sampling kernels on the same logits); nothing stays allocated."""
from __future__ import annotations

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from tests.test_structured_outputs import check_structured_outputs, spy_late_masks, structured_batch


def test_gpu_structured_outputs_one_step_ahead_as_without(checkpoint, rng):
    path, _ = checkpoint("qwen2_untied")
    kw = dict(model=path, device="cuda", dtype="float16", max_model_len=256, max_num_seqs=32)
    ahead = LLMEngine(EngineConfig(async_scheduling=True, **kw))
    prompts, params, kinds = structured_batch(ahead.tokenizer, rng, per_form=4, n=1)
    late = spy_late_masks(ahead)
    texts = check_structured_outputs(ahead.generate(prompts, params), kinds)
    print(f"{sum(late)} of {len(late)} steps masked late; graph steps {ahead.runner.graphs.steps}, "
          f"sampled in the graph {ahead.runner.graphs.steps_sampled_in_graph}")
    assert sum(late) > len(late) // 2
    bm = ahead.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    sync = LLMEngine(EngineConfig(async_scheduling=False, **kw))
    assert check_structured_outputs(sync.generate(prompts, params), kinds) == texts
