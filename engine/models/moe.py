"""The sparse MLP of Mixtral, Qwen2-MoE and Qwen3-MoE: checkpoint names, shapes and weights.

The experts of a layer are stacked at load time, gate and up rows merged as in the dense MLP: gate_up [E, 2I, H],
down [E, H, I], so the backend's grouped GEMMs index one array by expert. The math is ops/reference.moe (the numpy
backend) and ops/cuda/moe.py (the GPU's routing, grouped GEMMs and combine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from engine.config import ModelConfig


@dataclass(slots=True)
class MoeWeights:
    router: Any  # [E, H]
    gate_up: Any  # [E, 2I, H]
    down: Any  # [E, H, I]
    shared_gate_up: Any = None  # [2S, H] Qwen2-MoE's shared expert, or None
    shared_down: Any = None  # [H, S]
    shared_gate: Any = None  # [1, H]

    @property
    def shared(self) -> tuple | None:
        return None if self.shared_gate_up is None else (self.shared_gate_up, self.shared_down, self.shared_gate)

    def arrays(self) -> list:
        return [getattr(self, f) for f in self.__slots__]


def _names(c: ModelConfig, layer: int) -> tuple[str, Callable[[int, str], str]]:
    """The router's name, and expert(j, which) -> the name of expert j's gate, up or down projection."""
    if c.architecture == "MixtralForCausalLM":
        p = f"model.layers.{layer}.block_sparse_moe."
        w = {"gate": "w1", "up": "w3", "down": "w2"}
        return p + "gate.weight", lambda j, which: f"{p}experts.{j}.{w[which]}.weight"
    p = f"model.layers.{layer}.mlp."
    return p + "gate.weight", lambda j, which: f"{p}experts.{j}.{which}_proj.weight"


def shapes(c: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of layer `layer`'s sparse MLP, with its shape."""
    m, h = c.moe, c.hidden_size
    router, expert = _names(c, layer)
    out = {router: (m.num_experts, h)}
    for j in range(m.num_experts):
        out |= {expert(j, "gate"): (m.intermediate_size, h), expert(j, "up"): (m.intermediate_size, h),
                expert(j, "down"): (h, m.intermediate_size)}
    if m.shared_intermediate_size:
        p, s = f"model.layers.{layer}.mlp.shared_expert", m.shared_intermediate_size
        out |= {p + ".gate_proj.weight": (s, h), p + ".up_proj.weight": (s, h), p + ".down_proj.weight": (h, s),
                p + "_gate.weight": (1, h)}
    return out


def load(c: ModelConfig, layer: int, fetch: Callable[..., Any]) -> MoeWeights:
    """Layer `layer`'s experts through `fetch` (LlamaModel.load_weights'), stacked by expert."""
    m, h = c.moe, c.hidden_size
    router, expert = _names(c, layer)
    n, i = m.num_experts, m.intermediate_size
    gate_up = fetch(*(expert(j, which) for j in range(n) for which in ("gate", "up"))).reshape(n, 2 * i, h)
    down = fetch(*(expert(j, "down") for j in range(n))).reshape(n, h, i)
    weights = MoeWeights(fetch(router), gate_up, down)
    if m.shared_intermediate_size:
        p = f"model.layers.{layer}.mlp.shared_expert"
        weights.shared_gate_up = fetch(p + ".gate_proj.weight", p + ".up_proj.weight")
        weights.shared_down = fetch(p + ".down_proj.weight")
        weights.shared_gate = fetch(p + "_gate.weight")
    return weights
