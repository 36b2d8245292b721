"""Property-based fuzzing of config.json and preprocessor_config.json (issue 10).

Start from real configs (the released MolmoE config.json, the dense 7B-D fields, the tiny
official config, a `molmoe` block as `molmoe convert` writes it), replace, perturb or delete
random fields (nested ones included) with random JSON values: huge, negative and zero ints,
nan/inf/1e308 floats, strings, bools, lists, objects, null.

Properties: parsing either returns a config or raises ConfigError, within 2 s and 50 MB (peak of
Python allocations); a returned config builds on the meta device within a time bound, with the
closed-form parameter count. Preprocessor settings either construct (and then lay out any image
size quickly) or raise ConfigError.
"""
import copy
import json
import math
import time
import tracemalloc

import torch
from hypothesis import given
from hypothesis import strategies as st

from molmoe.config import ConfigError, from_hf_config, param_count, preset
from molmoe.model import Molmo
from molmoe.processing.preprocess import ImageSettings, image_layout
from tests.conftest import SHARED_DATA
from tests.fuzz import FUZZ, seeded
from tests.test_config import MOLMO_7B_D_CONFIG
from tests.tiny import official_config

PARSE_SECONDS = 2.0
PARSE_PEAK_BYTES = 50 * 2**20
BUILD_SECONDS = 10.0
BUILD_MAX_BLOCKS = 160  # decoder + ViT blocks built on meta per example (module count, not size)


def _bases() -> list[dict]:
    bases = [official_config(preset("tiny-molmoe")), dict(MOLMO_7B_D_CONFIG),
             {"model_type": "molmo", "molmoe": preset("tiny-7b-d").to_dict()}]
    released = SHARED_DATA / "molmoe-1b-0924" / "config.json"
    if released.is_file():
        bases.append(json.loads(released.read_text()))
    return bases


BASES = _bases()

SPECIAL_NUMBERS = [0, -1, 1, 2, 3, 7, 14, 64, 2**31, 2**63, 10**9, 10**30, -(10**9), 0.0, -0.0,
                   0.5, 1.0, 2048.0, 1e-300, 1e308, -1e308, math.inf, -math.inf, math.nan]
scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(SPECIAL_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-4, max_value=4096),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["moe", "sequential", "swiglu", "rms", "sdpa", "molmo", "molmoe", "dense"]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                         inner, max_size=3),
    max_leaves=8)


def _paths(obj, prefix=()) -> list[tuple]:
    """Every key path into nested objects (lists are leaves)."""
    out = []
    for key, value in obj.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out.extend(_paths(value, prefix + (key,)))
    return out


@st.composite
def mutated_configs(draw) -> dict:
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(raw)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict):
            continue
        key, old = path[-1], parent.get(path[-1])
        action = draw(st.sampled_from(["replace", "replace", "delete", "perturb"]))
        if action == "delete":
            parent.pop(key, None)
        elif action == "perturb" and isinstance(old, int) and not isinstance(old, bool):
            # near the valid region, so that many mutants still parse and get built
            parent[key] = draw(st.sampled_from([old + 1, old - 1, old * 2, old // 2, -old, 0,
                                                float(old)]))
        else:
            parent[key] = draw(json_values)
    return raw


@FUZZ
@seeded
@given(raw=mutated_configs())
def test_config_fuzz_parses_or_refuses_within_bounds(raw):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        config = from_hf_config(raw)
    except ConfigError as e:
        config = None
        assert "\n" not in str(e) and str(e).startswith("config.json: ")
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < PARSE_SECONDS, elapsed
    assert peak < PARSE_PEAK_BYTES, peak
    if config is None or config.text.n_layers + config.vision.num_layers > BUILD_MAX_BLOCKS:
        return
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Molmo(config)
    assert time.perf_counter() - t0 < BUILD_SECONDS
    assert sum(p.numel() for p in model.parameters()) == param_count(config)


PREPROCESSOR = {
    "base_image_input_size": [336, 336], "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_padding_mask": True,
    "image_patch_size": 14, "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_token_length_h": 12, "image_token_length_w": 12, "max_crops": 12,
    "overlap_margins": [4, 4],
}


@st.composite
def mutated_preprocessor_configs(draw) -> dict:
    raw = copy.deepcopy(PREPROCESSOR)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(sorted(PREPROCESSOR)))
        old = PREPROCESSOR[key]
        if isinstance(old, int) and not isinstance(old, bool) and draw(st.booleans()):
            raw[key] = draw(st.sampled_from([old + 2, old - 2, old * 2, 0, 100000, 256, 257]))
        elif isinstance(old, list) and draw(st.booleans()):
            raw[key] = [draw(scalars) if draw(st.booleans()) else v for v in old]
        else:
            raw[key] = draw(json_values)
    return raw


@FUZZ
@seeded
@given(raw=mutated_preprocessor_configs(),
       size=st.tuples(st.integers(min_value=1, max_value=20000),
                      st.integers(min_value=1, max_value=20000)))
def test_preprocessor_fuzz_constructs_or_refuses(raw, size):
    t0 = time.perf_counter()
    try:
        settings = ImageSettings.from_config(raw, source="p.json")
    except ConfigError as e:
        assert str(e).startswith("p.json: ") and "\n" not in str(e)
        return
    layout = image_layout(size[0], size[1], settings)  # the tiling search of the settings
    assert 1 <= layout.tiling[0] * layout.tiling[1] <= settings.max_crops
    assert all(s > 0 for s in settings.image_std)
    assert time.perf_counter() - t0 < PARSE_SECONDS
