"""Loader, adapter and converter: round trips in every official layout, and clear errors."""
import json
import re
import pathlib
import pickle

import pytest
import torch

import molmoe
from molmoe.checkpoint import CheckpointError, to_native, to_official
from molmoe.checkpoint.convert import convert
from tests.tiny import random_inputs, random_model, write_checkpoint

LAYOUTS = [("tiny-7b-d", "dense"), ("tiny-7b-o", "dense"), ("tiny-molmoe", "molmoe-hf"),
           ("tiny-molmoe", "molmoe-megablocks")]


def _logits(model, config):
    ids, images, masks, idx = random_inputs(config, batch=2)
    with torch.no_grad():
        return model(ids, images, masks, idx)


@pytest.mark.parametrize("name, layout", LAYOUTS)
def test_official_layout_round_trip(tmp_path, name, layout):
    model = random_model(name)
    write_checkpoint(model, tmp_path / "ckpt", layout)
    loaded = molmoe.load(tmp_path / "ckpt")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(_logits(loaded, model.config), _logits(model, model.config))


@pytest.mark.parametrize("name, layout", LAYOUTS)
def test_adapter_inverse(name, layout):
    model = random_model(name)
    native = model.state_dict()
    official = to_official(native, layout)
    expected = {k: v.shape for k, v in native.items()}
    back = to_native({k: (lambda v=v: v) for k, v in official.items()}, model.config, expected)
    assert back.keys() == native.keys()
    assert all(torch.equal(back[k], native[k]) for k in native)


def test_official_key_names_and_shapes_molmoe_hf():
    """Spot-check the released MolmoE key strings of spec §2.3."""
    model = random_model("tiny-molmoe")
    official = to_official(model.state_dict(), "molmoe-hf")
    t = model.config.text
    assert official["model.transformer.blocks.1.attn.att_proj.weight"].shape == (
        t.d_model + 2 * t.kv_dim, t.d_model)
    assert official["model.transformer.blocks.0.mlp.experts.7.down_proj.weight"].shape == (
        t.d_model, t.moe.expert_hidden)
    assert official["model.transformer.blocks.0.mlp.gate.weight"].shape == (t.moe.num_experts,
                                                                             t.d_model)
    assert "lm_head.weight" in official
    assert "model.vision_backbone.image_pooling_2d.wq.weight" in official


def test_prefix_is_optional(tmp_path):
    model = random_model("tiny-molmoe")
    state = {k.removeprefix("model."): v for k, v in to_official(model.state_dict(),
                                                                 "molmoe-hf").items()}
    write_checkpoint(model, tmp_path / "c", "molmoe-hf")
    torch.save(state, tmp_path / "c" / "pytorch_model.bin")
    loaded = molmoe.load(tmp_path / "c")
    assert torch.equal(_logits(loaded, model.config), _logits(model, model.config))


@pytest.mark.parametrize("dtype, wdtype, autocast", [("bfloat16", torch.bfloat16, None),
                                                      ("amp_bf16", torch.float32, torch.bfloat16)])
def test_precision_modes(tmp_path, dtype, wdtype, autocast):
    write_checkpoint(random_model("tiny-7b-d"), tmp_path / "c", "dense")
    m = molmoe.load(tmp_path / "c", dtype=dtype)
    assert m.decoder.lm_head.weight.dtype == wdtype and m.autocast_dtype == autocast


# ---------------------------------------------------------------------------- bad input


def _dense_ckpt(tmp_path):
    return write_checkpoint(random_model("tiny-7b-d"), tmp_path / "c", "dense")


def _rewrite_bin(tmp_path, mutate):
    model = random_model("tiny-molmoe")
    d = write_checkpoint(model, tmp_path / "c", "molmoe-hf")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    mutate(state)
    torch.save(state, d / "pytorch_model.bin")
    return d


def test_missing_key_is_named(tmp_path):
    d = _rewrite_bin(tmp_path, lambda s: s.pop("model.transformer.blocks.1.attn.q_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.1\.attn\.q_norm\.weight"):
        molmoe.load(d)


def test_missing_expert_is_named(tmp_path):
    d = _rewrite_bin(tmp_path, lambda s: s.pop("model.transformer.blocks.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.w_up: experts \[3\]"):
        molmoe.load(d)


def test_unexpected_key_is_named(tmp_path):
    d = _rewrite_bin(tmp_path, lambda s: s.update({"model.transformer.blocks.0.attn.rogue": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.0\.attn\.rogue"):
        molmoe.load(d)


def test_misshaped_key_names_expected_and_found(tmp_path):
    key = "model.transformer.blocks.0.attn.attn_out.weight"
    d = _rewrite_bin(tmp_path, lambda s: s.update({key: torch.zeros(64, 63)}))
    with pytest.raises(CheckpointError, match=rf"{key}.*expected shape \[64, 64\], found \[64, 63\]"):
        molmoe.load(d)


def test_misshaped_expert_is_named(tmp_path):
    key = "model.transformer.blocks.1.mlp.experts.2.down_proj.weight"
    d = _rewrite_bin(tmp_path, lambda s: s.update({key: torch.zeros(64, 31)}))
    with pytest.raises(CheckpointError, match=rf"{key}.*expected shape \[64, 32\], found \[64, 31\]"):
        molmoe.load(d)


def test_integer_tensor_is_refused(tmp_path):
    key = "model.transformer.ln_f.weight"
    d = _rewrite_bin(tmp_path, lambda s: s.update({key: torch.ones(64, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match=rf"{key}.*floating-point"):
        molmoe.load(d)


def test_truncated_safetensors_names_file(tmp_path):
    d = _dense_ckpt(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        molmoe.load(d)


def test_missing_shard_is_named(tmp_path):
    d = _dense_ckpt(tmp_path)
    (d / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        molmoe.load(d)


def test_corrupt_bin_names_file(tmp_path):
    d = write_checkpoint(random_model("tiny-molmoe"), tmp_path / "c", "molmoe-hf")
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*truncated or corrupt"):
        molmoe.load(d)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_unrestricted_pickle_is_refused_with_instructions(tmp_path):
    d = write_checkpoint(random_model("tiny-molmoe"), tmp_path / "c", "molmoe-hf")
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*safetensors"):
        molmoe.load(d)


def test_unknown_model_type(tmp_path):
    d = _dense_ckpt(tmp_path)
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="supported: molmo"):
        molmoe.load(d)


def test_no_weights_lists_directory(tmp_path):
    d = _dense_ckpt(tmp_path)
    for f in d.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint weights found.*config.json"):
        molmoe.load(d)


def test_not_a_dir_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such local directory"):
        molmoe.load(tmp_path / "does" / "not" / "exist")


def test_hub_id_resolves_through_cache(tmp_path, monkeypatch):
    """A cached hub snapshot loads offline (the hub cache layout, built by hand)."""
    model = random_model("tiny-7b-d")
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-molmo" / "snapshots" / ("0" * 40)
    write_checkpoint(model, snap, "dense")
    (cache / "models--acme--tiny-molmo" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-molmo" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = molmoe.load("acme/tiny-molmo")
    assert torch.equal(_logits(loaded, model.config), _logits(model, model.config))
    assert loaded.source == str(snap)  # read from the cache snapshot
    with pytest.raises(CheckpointError, match="'acme/other'.*not in the local cache"):
        molmoe.load("acme/other")  # offline and not cached: a clear error, no network


def test_shard_key_missing_from_index_is_named(tmp_path):
    """A tensor in a shard that the index does not list is an error, not silently dropped."""
    from safetensors.torch import load_file, save_file

    d = _dense_ckpt(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    tensors["model.transformer.blocks.0.rogue.weight"] = torch.zeros(3)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError,
                       match=r"model-00002-of-00002.safetensors.*index.*blocks\.0\.rogue\.weight"):
        molmoe.load(d)


def test_float64_tensor_is_refused(tmp_path):
    """weights_only admits any tensor; a dtype no checkpoint is stored in is named."""
    key = "model.transformer.blocks.0.attn.attn_out.weight"
    d = _rewrite_bin(tmp_path, lambda s: s.update({key: s[key].double()}))
    with pytest.raises(CheckpointError, match=rf"{key}.*float32/bfloat16/float16.*found torch\.float64"):
        molmoe.load(d)


def test_dtype_is_checked_against_config_torch_dtype(tmp_path):
    """Dense configs declare torch_dtype; a tensor stored in another dtype is named."""
    from safetensors.torch import load_file, save_file

    d = _dense_ckpt(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float32"}))
    molmoe.load(d)  # consistent: loads
    shard = d / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].bfloat16()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError,
                       match=rf"{re.escape(key)}.*expected dtype torch\.float32.*found torch\.bfloat16"):
        molmoe.load(d)
    (d / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float17"}))
    with pytest.raises(CheckpointError, match="unknown torch_dtype 'float17'"):
        molmoe.load(d)


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's data (Linux /proc/self/maps), else None."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("layout", ["dense", "converted", "molmoe-hf"])
def test_weights_are_memory_mapped_not_copied(tmp_path, layout):
    """The loaded parameters ARE the file's pages (no extra copy in RAM): their data lies in a
    mapping of the checkpoint file. (Only stacked per-expert .bin weights are new memory.)"""
    name = "tiny-molmoe" if layout == "molmoe-hf" else "tiny-7b-d"
    d = write_checkpoint(random_model(name), tmp_path / "c", "molmoe-hf" if layout == "molmoe-hf"
                         else "dense")
    if layout == "converted":
        d = convert(d, tmp_path / "conv")
    model = molmoe.load(d)
    files = {str(p.resolve()) for p in d.iterdir()}
    params = {"head": model.decoder.lm_head.weight, "qkv": model.decoder.blocks[1].attn.qkv.weight,
              "vit": model.vision.image_vit.positional_embedding}
    for what, p in params.items():
        assert _mapped_file(p) in files, (what, _mapped_file(p))


def test_bin_with_a_short_storage_record_names_file(tmp_path):
    """A well-formed zip whose tensor record is shorter than the tensor it declares (a malformed
    archive, read memory-mapped): a clear error naming the file, not garbage or a crash."""
    import zipfile

    d = write_checkpoint(random_model("tiny-molmoe"), tmp_path / "c", "molmoe-hf")
    f = d / "pytorch_model.bin"
    with zipfile.ZipFile(f) as zin:
        records = {n: zin.read(n) for n in zin.namelist()}
    biggest = max((n for n in records if "/data/" in n), key=lambda n: len(records[n]))
    records[biggest] = records[biggest][: len(records[biggest]) // 2]
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zout:
        for n, data in records.items():
            zout.writestr(n, data)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*truncated or corrupt"):
        molmoe.load(d)
