import json

import pytest

from molmoe.config import ConfigError, MolmoConfig, from_hf_config, load_config, preset

# The dense models' config.json fields (spec §1.1/§1.2), as released for Molmo-7B-D.
MOLMO_7B_D_CONFIG = {
    "architectures": ["MolmoForCausalLM"], "attention_layer_norm": False, "clip_qkv": None,
    "embedding_size": 152064, "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 37888, "layer_norm_eps": 1e-06, "layer_norm_type": "rms",
    "max_position_embeddings": 4096, "model_type": "molmo", "norm_after": False,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "qkv_bias": True, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32", "use_cache": True, "use_position_ids": True, "vocab_size": 152064,
    "weight_tying": False,
}
MOLMO_7B_O_CONFIG = {
    **MOLMO_7B_D_CONFIG, "attention_layer_norm": True, "embedding_size": 100352,
    "hidden_size": 4096, "intermediate_size": 22016, "norm_after": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": None,
    "qkv_bias": False, "rope_theta": 500000.0, "vocab_size": 100278,
}
MOLMO_72B_CONFIG = {
    **MOLMO_7B_D_CONFIG, "hidden_size": 8192, "intermediate_size": 59136, "layer_norm_eps": 1e-05,
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
}


def test_released_molmoe_config_parses_to_preset(shared_data):
    assert load_config(shared_data / "molmoe-1b-0924" / "config.json") == preset("molmoe-1b")


@pytest.mark.parametrize("raw, name", [(MOLMO_7B_D_CONFIG, "molmo-7b-d"),
                                       (MOLMO_7B_O_CONFIG, "molmo-7b-o"),
                                       (MOLMO_72B_CONFIG, "molmo-72b")])
def test_dense_configs_parse_to_presets(raw, name):
    assert from_hf_config(raw) == preset(name)


def test_preset_values_match_spec_table():
    d = preset("molmo-7b-d").text
    assert (d.kv_dim, d.d_model + 2 * d.kv_dim, 2 * d.ffn_hidden) == (512, 4608, 37888)
    o = preset("molmo-7b-o").text
    assert (o.kv_dim, o.norm_after, o.qk_norm) == (4096, True, True)
    e = preset("molmoe-1b")
    assert (e.text.moe.num_experts, e.text.moe.top_k, e.projector_hidden) == (64, 8, 1024)
    assert e.vision.feature_dim == 2048 and e.vision.tokens_per_crop == 144


def test_config_dict_round_trip():
    for name in ("molmoe-1b", "molmo-7b-d", "tiny-molmoe", "tiny-7b-o"):
        c = preset(name)
        assert MolmoConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_unknown_model_type_lists_supported():
    with pytest.raises(ConfigError, match=r"unsupported model_type 'llava'.*supported: molmo"):
        from_hf_config({"model_type": "llava", "hidden_size": 8})


def test_missing_field_is_named():
    raw = dict(MOLMO_7B_D_CONFIG)
    del raw["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        from_hf_config(raw)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="molmoe-1b"):
        preset("molmo-3b")


def test_malformed_molmoe_block_is_a_config_error():
    block = preset("tiny-7b-d").to_dict()
    del block["text"]["n_layers"]
    with pytest.raises(ConfigError, match=r"x\.json: malformed 'molmoe' config block.*n_layers"):
        from_hf_config({"molmoe": block}, source="x.json")
    with pytest.raises(ConfigError, match="malformed"):
        from_hf_config({"molmoe": {"text": 3}}, source="x.json")
