"""A model's config parameters: the vocabulary of config-side labels (no sympy: read by the cached path too)."""

from __future__ import annotations

# Config parameters (besides tp) that labels may use, read from config.json.
OPTIONAL_ATOMS = ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "sliding_window")


def config_params(config: dict, tp: int) -> dict[str, int]:
    """The named config parameters of a model (the vocabulary of config-side labels)."""
    heads = config["num_attention_heads"]
    params = {
        "hidden_size": config["hidden_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab_size": config["vocab_size"],
        "tp": tp,
    }
    if config.get("intermediate_size"):
        params["intermediate_size"] = config["intermediate_size"]
    if config.get("max_position_embeddings"):
        params["max_position_embeddings"] = config["max_position_embeddings"]
    for key in OPTIONAL_ATOMS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            params[key] = value
    prf = config.get("partial_rotary_factor")
    if prf and prf != 1:
        params["rotary_dim"] = int(params["head_dim"] * prf)
    return params
