"""Issue 10, configs: every value validated before anything is allocated, sizes bounded, values
the model does not implement refused, preprocessor settings checked against the ViT, EOS and
vocabulary checked against the model."""
import json
import math
import time

import pytest
import torch

from molmoe.config import PRESETS, ConfigError, MolmoConfig, from_hf_config, load_config, preset
from molmoe.errors import MolmoeError
from molmoe.model import Molmo
from molmoe.processing.preprocess import ImageSettings, select_tiling
from tests.test_config import MOLMO_7B_D_CONFIG
from tests.tiny import official_config


@pytest.fixture(scope="module")
def molmoe_raw(shared_data) -> dict:
    return json.loads((shared_data / "molmoe-1b-0924" / "config.json").read_text())


def _refused(raw: dict, *patterns: str, source="x/config.json") -> str:
    """from_hf_config(raw) raises a ConfigError naming the source and each pattern, fast."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        from_hf_config(raw, source=source)
    assert time.perf_counter() - t0 < 1.0
    message = str(info.value)
    assert message.startswith(f"{source}: ") and "\n" not in message
    for p in patterns:
        assert p in message, message
    return message


def _with(raw: dict, **changes) -> dict:
    out = json.loads(json.dumps(raw))
    for key, value in changes.items():
        if "__" in key:  # nested: vision_backbone__image_num_layers
            outer, inner = key.split("__")
            out[outer][inner] = value
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ item 1: unbounded sizes

@pytest.mark.parametrize("key, value", [
    ("moe_num_experts", 10**9), ("moe_num_experts", 1e9), ("n_layers", 10**9), ("n_layers", 1e9),
    ("vision_backbone__image_num_layers", 10**6), ("d_model", 2**40), ("vocab_size", 10**12),
    ("embedding_size", 10**12), ("max_position_embeddings", 2**40),
    ("vision_backbone__image_default_input_size", [14 * 10**4, 14 * 10**4]),
])
def test_huge_sizes_are_refused_before_anything_is_built(molmoe_raw, key, value):
    _refused(_with(molmoe_raw, **{key: value}), key.split("__")[-1],
             str(value if isinstance(value, (int, float)) else value[0]))


@pytest.mark.parametrize("key, value, why", [
    ("n_layers", True, "integer"), ("n_layers", 16.0, "integer"), ("n_heads", "16", "integer"),
    ("d_model", [2048], "integer"), ("d_model", {"x": 1}, "integer"),
    ("moe_top_k", 8.5, "integer"), ("n_kv_heads", False, "integer"),
    ("attention_layer_norm", "false", "true or false"), ("qkv_bias", 0, "true or false"),
    ("rope_theta", "1e4", "number"), ("layer_norm_eps", True, "number"),
    ("vit_layers", "-2", "list"), ("vit_layers", [-2.0, -9], "vit_layers"),
    ("vision_backbone", [1], "object"), ("vision_backbone__image_emb_dim", 1024.0, "integer"),
    ("vision_backbone__image_default_input_size", 336, "list"),
])
def test_wrong_types_are_refused(molmoe_raw, key, value, why):
    _refused(_with(molmoe_raw, **{key: value}), key.split("__")[-1], why)


@pytest.mark.parametrize("key, value, why", [
    ("n_heads", 15, "multiple of n_heads"), ("n_kv_heads", 5, "multiple of n_kv_heads"),
    ("n_heads", 2048, "odd head dim"), ("n_layers", 0, "1..1024"), ("n_kv_heads", 0, "1..16"),
    ("d_model", -2048, "mlp_ratio * d_model"), ("vocab_size", 0, "1.."),
    ("embedding_size", 50000, "50280.."),
    ("vision_backbone__image_num_heads", 5, "multiple of vision_backbone.image_num_heads = 5"),
    ("vision_backbone__image_patch_size", 15, "multiple of vision_backbone.image_patch_size"),
    ("vision_backbone__image_default_input_size", [350, 350], "25 patches per side"),
    ("vision_backbone__image_default_input_size", [322, 322], "23 patches per side"),
    ("vision_backbone__image_default_input_size", [336, 448], "square"),
    ("vit_layers", [], "block indices"), ("vit_layers", [23], "-23..22"),
    ("vit_layers", [-24], "-23..22"), ("moe_top_k", 65, "1..64"), ("moe_num_experts", 0, "1.."),
    ("rope_theta", 0, "finite"), ("rope_theta", -1.0, "finite"), ("rope_theta", math.nan, "finite"),
    ("rope_theta", math.inf, "finite"), ("rope_theta", 1e308 * 10, "finite"),
    ("layer_norm_eps", 0, "> 0"), ("layer_norm_eps", -1e-5, "> 0"), ("layer_norm_eps", 1.0, "< 1"),
    ("layer_norm_eps", math.nan, "finite"), ("layer_norm_eps", 1e-300, "smallest normal"),
    ("vision_backbone__image_norm_eps", 0.0, "> 0"), ("mlp_hidden_size", 2047, "even"),
    ("mlp_hidden_size", 0, "even"),
])
def test_out_of_range_values_are_refused(molmoe_raw, key, value, why):
    _refused(_with(molmoe_raw, **{key: value}), key.split("__")[-1], why)


def test_json_nan_and_huge_integer_literals(tmp_path, molmoe_raw):
    """Python's json reads NaN and arbitrarily long integers: both end as a ConfigError."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(molmoe_raw).replace('"rope_theta": 10000.0', '"rope_theta": NaN'))
    with pytest.raises(ConfigError, match="rope_theta = nan"):
        load_config(path)
    path.write_text(json.dumps(molmoe_raw).replace('"n_layers": 16', '"n_layers": ' + "9" * 5000))
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        load_config(path)


def test_molmoe_block_and_from_dict_are_validated():
    block = preset("tiny-molmoe").to_dict()
    for path, value, key in [(("text", "n_layers"), 10**9, "molmoe.text.n_layers"),
                             (("text", "moe", "top_k"), 0, "molmoe.text.moe.top_k"),
                             (("vision", "vit_layers"), [7], "molmoe.vision.vit_layers"),
                             (("family",), "llama", "molmoe.family"),
                             (("text", "rope_theta"), -1.0, "molmoe.text.rope_theta"),
                             (("text", "bogus"), 1, "unknown field text.bogus")]:
        bad = json.loads(json.dumps(block))
        target = bad
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
        _refused({"molmoe": bad}, key)
        with pytest.raises(ConfigError):
            MolmoConfig.from_dict(bad)
    for bad in ([], None, "x", {"text": []}, {"text": None, "projector_hidden": 1}):
        with pytest.raises(ConfigError):
            from_hf_config({"molmoe": bad})


def test_presets_and_released_configs_still_load(molmoe_raw):
    for name in PRESETS:
        preset(name)
    from_hf_config(molmoe_raw)
    from_hf_config(MOLMO_7B_D_CONFIG)
    for name in ("tiny-molmoe",):
        from_hf_config(official_config(preset(name)))


def test_dataclasses_validate_on_replace():
    """Presets, dataclasses.replace and direct construction run the same checks."""
    import dataclasses

    text = preset("tiny-molmoe").text
    with pytest.raises(ConfigError, match="top_k = 9"):
        dataclasses.replace(text, moe=dataclasses.replace(text.moe, top_k=9))
    with pytest.raises(ConfigError, match="n_kv_heads = 3"):
        dataclasses.replace(text, n_kv_heads=3)


# ------------------------------------------------------------ item 2: sizes and memory

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_is_closed_form_of_the_model(name):
    from molmoe.config import param_count

    config = preset(name)
    with torch.device("meta"):
        model = Molmo(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_molmo_72b_param_constant_matches_the_preset():
    from molmoe.config import MOLMO_72B_PARAMS, param_count

    assert MOLMO_72B_PARAMS == param_count(preset("molmo-72b"))


def test_configs_beyond_the_sanity_bound_are_refused_with_the_figure(monkeypatch):
    # 1024 layers of a 65536-wide dense decoder: ~5e13 parameters, each field within its cap.
    raw = dict(MOLMO_7B_D_CONFIG, hidden_size=65536, num_attention_heads=512,
               num_key_value_heads=512, num_hidden_layers=1024, intermediate_size=131072)
    _refused(raw, "parameters", "GiB at float32", "sanity bound")
    # The bound is the user's to raise.
    monkeypatch.setenv("MOLMOE_MAX_PARAMS", "1e15")
    assert from_hf_config(raw).text.n_layers == 1024


def _host_available() -> int:
    from molmoe.config import available_memory

    return available_memory(torch.device("cpu"))[0]


def test_load_refuses_weights_that_do_not_fit_in_memory(tmp_path):
    """A config whose bf16 copy of fp32 weights cannot fit: refused with both figures, before
    the (absent) weights are opened."""
    import molmoe
    from molmoe.config import InsufficientMemoryError, param_count

    raw = dict(MOLMO_7B_D_CONFIG, hidden_size=16384, num_attention_heads=128,
               num_key_value_heads=8, num_hidden_layers=60, intermediate_size=2 * 53248)
    need = param_count(from_hf_config(raw)) * 2
    if need <= _host_available():
        pytest.skip("this machine has more memory than the test config needs")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InsufficientMemoryError, match=r"need \d+\.\d GiB at bfloat16 on cpu, but "
                                                      r"there are only \d+\.\d GiB available"):
        molmoe.load(tmp_path, dtype="bfloat16")


def test_memory_check_does_not_refuse_a_pure_memory_map(tmp_path, monkeypatch):
    """Memory-mapped safetensors in their stored dtype on the CPU allocate no copy: no check, so
    the load goes on to the weights (here: a missing shard, a CheckpointError)."""
    import molmoe
    from molmoe.checkpoint.adapter import CheckpointError
    from molmoe.config import check_memory

    raw = dict(MOLMO_7B_D_CONFIG, hidden_size=16384, num_attention_heads=128,
               num_key_value_heads=8, num_hidden_layers=60, intermediate_size=2 * 53248)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"")
    config = from_hf_config(raw)
    check_memory(config, tmp_path, dtype=torch.float32, device="cpu", stored_dtype=torch.float32)
    with pytest.raises(CheckpointError):
        molmoe.load(tmp_path, dtype="float32")
    monkeypatch.setenv("MOLMOE_MEMORY_CHECK", "0")  # the user's opt-out
    check_memory(config, tmp_path, dtype=torch.bfloat16, device="cpu", stored_dtype=torch.float32)


# ---------------------------------------------------- item 3: values the model does not implement

@pytest.mark.parametrize("key, value", [
    ("moe_top_k", 0), ("image_pooling_h", 3), ("image_pooling_w", 3), ("image_pooling_h", 1),
    ("max_position_embeddings", 0), ("max_position_embeddings", 8), ("block_type", "llama"),
    ("block_type", 7), ("attention_type", "flash"),
    ("activation_type", "gelu"), ("multi_query_attention", True), ("rope", False),
    ("alibi", True), ("weight_tying", True), ("layer_norm_type", "default"),
    ("image_pooling_2d", "attention"), ("image_projector", "linear"), ("clip_qkv", 8.0),
    ("include_bias", True), ("moe_shared_expert", True), ("moe_dropless", False),
    ("rope_impl", "cockatoo"), ("head_dim", 64), ("image_padding_embed", "pad"),
    ("scale_logits", True), ("attn_logit_softcapping", 30.0), ("moe_interleave", True),
    ("vision_backbone__image_mlp_activations", "gelu"),
    ("vision_backbone__image_num_key_value_heads", 8),
    ("vision_backbone__image_head_dim", 32), ("vision_backbone__image_num_pos", 600),
    ("vision_backbone__image_pos_patch_size", 16),
    ("vision_backbone__image_model_type", "siglip"),
])
def test_unimplemented_values_are_refused(molmoe_raw, key, value):
    _refused(_with(molmoe_raw, **{key: value}), key.split("__")[-1])


@pytest.mark.parametrize("key, value", [("tie_word_embeddings", True), ("weight_tying", True),
                                        ("layer_norm_type", "default"), ("clip_qkv", 8.0),
                                        ("max_position_embeddings", 0),
                                        ("num_key_value_heads", 0), ("intermediate_size", 37887)])
def test_unimplemented_dense_values_are_refused(key, value):
    _refused(dict(MOLMO_7B_D_CONFIG, **{key: value}), key)


def test_zero_is_not_a_default():
    """`0` used to fall back to the default through `or` (0 kv heads -> n_heads)."""
    _refused(dict(MOLMO_7B_D_CONFIG, num_key_value_heads=0), "num_key_value_heads = 0")
    _refused(dict(MOLMO_7B_D_CONFIG, embedding_size=0), "embedding_size = 0")


# ------------------------------------------------------------ item 4: preprocessor settings

@pytest.fixture(scope="module")
def pre_raw(shared_data) -> dict:
    return json.loads((shared_data / "molmoe-1b-0924" / "preprocessor_config.json").read_text())


@pytest.mark.parametrize("key, value, why", [
    ("max_crops", 100000, "1..256"), ("max_crops", 0, "1..256"), ("max_crops", "12", "integer"),
    ("max_crops", 12.0, "integer"), ("max_crops", True, "integer"),
    ("image_std", [0.0, 0.26, 0.27], "divides by zero"), ("image_std", [-1, 1, 1], "in 0.0001"),
    # finite as float64, but 1e308 flattens every pixel to 0.0 in float32 (a silent blank image)
    ("image_std", [1e308, 1, 1], "flattens"), ("image_std", [1e-45, 1, 1], "in 0.0001"),
    ("image_mean", [1e308, 0, 0], "within"),
    ("image_std", [math.nan, 1, 1], "finite"), ("image_mean", [math.inf, 0, 0], "finite"),
    ("image_mean", [0.5, 0.5], "3 finite"), ("image_mean", "grey", "3 finite"),
    ("overlap_margins", [-2, 4], ">= 0"), ("overlap_margins", [4], "2 integers"),
    ("overlap_margins", [12, 12], "leave part"), ("image_patch_size", 0, ">= 1"),
    ("base_image_input_size", [336], "2 integers"), ("base_image_input_size", [322, 322], "even"),
    ("image_token_length_h", 11, "must be 12"), ("do_normalize", "yes", "true or false"),
])
def test_preprocessor_values_are_validated(pre_raw, key, value, why):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"^p.json: {key} = .*{why}"):
        ImageSettings.from_config({**pre_raw, key: value}, source="p.json")
    assert time.perf_counter() - t0 < 1.0
    for bad in ([], None, "x"):
        with pytest.raises(ConfigError, match="p.json: must be a JSON object"):
            ImageSettings.from_config(bad, source="p.json")


def _quadratic_select_tiling(h, w, window, max_crops):
    """The released enumeration (all i, j <= max_crops), for comparison."""
    import numpy as np

    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                      if i * j <= max_crops), key=lambda t: (t[0] * t[1], t[0]))
    cand = np.array(tilings, dtype=np.int32) * window
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (cand.astype(np.float32) / np.array([h, w], dtype=np.float32)).min(-1)
    if np.all(s < 1):
        return tilings[int(np.argmax(s))]
    return tilings[int(np.argmin(np.where(s < 1.0, np.float32(1e10), s)))]


def test_select_tiling_is_unchanged_and_not_quadratic():
    for max_crops in (1, 2, 6, 12, 30):
        for h, w in [(368, 528), (242, 424), (-12, -12), (0, 500), (888, 188), (1888, 2888),
                     (5000, 100), (100, 5000)]:
            assert select_tiling(h, w, 224, max_crops) == \
                _quadratic_select_tiling(h, w, 224, max_crops)
    t0 = time.perf_counter()
    select_tiling(10**6, 10**6, 224, 20000)  # the quadratic enumeration: 4e8 pairs
    assert time.perf_counter() - t0 < 1.0


def _checkpoint_with(tmp_path, shared_data, preprocessor: dict, config: dict):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).symlink_to(shared_data / "molmoe-1b-0924" / name)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_processor_refuses_settings_that_do_not_match_the_vit(tmp_path, shared_data, pre_raw,
                                                              molmoe_raw):
    from molmoe.processing import Processor

    pre = {**pre_raw, "base_image_input_size": [448, 448], "image_token_length_h": 16,
           "image_token_length_w": 16}
    d = _checkpoint_with(tmp_path, shared_data, pre, molmoe_raw)
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: base_image_input_size gives "
                                          r"448, but the model's ViT has image_size 336"):
        Processor.from_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(pre_raw))
    assert Processor.from_pretrained(d).max_positions == 32768


# ------------------------------------------------------ item 5: config files that are not configs

def test_load_config_on_a_directory_names_it(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["[]", "null", '"config"', "5", "true", '[{"d_model": 1}]'])
def test_config_json_that_is_not_an_object(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: must be a JSON object"):
        load_config(path)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        from_hf_config(json.loads(text))


def test_config_json_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"d_model": "\xff"}')
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8"):
        load_config(path)


def test_checkpoint_dir_with_list_config_is_a_user_error(tmp_path):
    import molmoe

    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(MolmoeError, match="config.json: must be a JSON object"):
        molmoe.load(tmp_path)


# ---------------------------------------------------------------- item 6: EOS and vocabulary

def test_resolve_eos_from_the_released_files(shared_data, olmoe, qwen2):
    from molmoe.generation import resolve_eos

    assert resolve_eos(shared_data / "molmoe-1b-0924", olmoe,
                       preset("molmoe-1b")) == 50279
    # 7B-D ships no generation_config.json: the tokenizer's <|endoftext|> (spec §5.1)
    assert resolve_eos(shared_data / "molmo-7b-d-0924", qwen2,
                       preset("molmo-7b-d")) == 151643


@pytest.mark.parametrize("value, why", [
    ("abc", "not an integer"), (1e9, "not an integer"), (50279.0, "not an integer"),
    (True, "not an integer"), (-1, "outside the model's output ids 0..50303"),
    (10**9, "outside"), (50304, "outside"), (50300, "not in the tokenizer's vocabulary"),
    ([], "empty list"), (["x"], "not an integer"), ([50279, -1], "outside"), ({"id": 1}, "not an"),
])
def test_bad_eos_token_id_is_refused(tmp_path, olmoe, value, why):
    from molmoe.generation import resolve_eos

    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ConfigError, match=f"{path}: .*{why}"):
        resolve_eos(tmp_path, olmoe, preset("molmoe-1b"))


def test_eos_list_null_and_unreadable(tmp_path, olmoe):
    from molmoe.generation import resolve_eos

    config, path = preset("molmoe-1b"), tmp_path / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": [50279, 1]}))
    assert resolve_eos(tmp_path, olmoe, config) == 50279
    path.write_text(json.dumps({"eos_token_id": None, "pad_token_id": 1}))
    assert resolve_eos(tmp_path, olmoe, config) == olmoe.eos_token_id
    for text in ("[]", "{", "null"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=str(path)):
            resolve_eos(tmp_path, olmoe, config)


def test_check_vocabulary(olmoe, qwen2):
    import dataclasses

    from molmoe.generation import check_vocabulary

    check_vocabulary(olmoe, preset("molmoe-1b"))
    d = preset("molmo-7b-d")
    check_vocabulary(qwen2, d)  # image ids 152064.. sit in new_embedding rows 0..4
    small = d.replace(text=dataclasses.replace(d.text, additional_vocab_size=4))
    with pytest.raises(ConfigError, match=r"id 152068 \('<\|image\|>'\), but the model has 152068 "
                                          r"embedding rows"):
        check_vocabulary(qwen2, small)
    with pytest.raises(ConfigError, match="vocab.json: the tokenizer has id 152068"):
        check_vocabulary(qwen2, preset("molmoe-1b"))


def test_app_load_uses_the_checks(tmp_path):
    """`molmoe generate`'s loader refuses a bad eos_token_id instead of never stopping."""
    import shutil

    from molmoe.app import _load
    from molmoe.demo import demo_checkpoint

    d = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint(tmp_path / "cache"), d)
    assert _load(str(d), device="cpu")[2] == 256
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "abc"}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id 'abc'"):
        _load(str(d), device="cpu")


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "0", "lots"])
def test_max_params_environment_value_is_checked(monkeypatch, value):
    from molmoe.config import max_params

    monkeypatch.setenv("MOLMOE_MAX_PARAMS", value)
    with pytest.raises(ConfigError, match="MOLMOE_MAX_PARAMS"):
        max_params()
