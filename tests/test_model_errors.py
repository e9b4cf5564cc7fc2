"""Bad model directories and bad inputs fail with a message that names the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from headway.modeling import ModelError, load_model
from tests.conftest import VOCAB, build_hf_model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "m"
    build_hf_model("qwen3").save_pretrained(path)
    return path


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_model_type_names_the_type_and_the_choices(model_dir):
    _edit_config(model_dir, model_type="gpt2")
    with pytest.raises(
        ModelError, match=r"config\.json: model_type 'gpt2' is not supported.*qwen3"
    ):
        load_model(model_dir)


def test_missing_config_field_is_named(model_dir):
    _edit_config(model_dir, hidden_size=None)
    with pytest.raises(ModelError, match="missing required field 'hidden_size'"):
        load_model(model_dir)


def test_missing_config_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"config\.json: not found"):
        load_model(tmp_path / "empty")


def test_missing_weight_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(
        ModelError, match=r"no model\.safetensors or model\.safetensors\.index\.json"
    ):
        load_model(model_dir)


def test_truncated_weight_file_is_named(model_dir):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelError, match=r"model\.safetensors: cannot read safetensors \(truncated"
    ):
        load_model(model_dir)


def test_missing_shard_of_an_index(tmp_path):
    path = tmp_path / "sharded"
    build_hf_model("llama").save_pretrained(path, max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match=f"{shard.name}: listed in .* but missing"):
        load_model(path)


def test_shape_mismatch_names_the_tensor(model_dir):
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, file)
    with pytest.raises(ModelError, match=f"tensor '{key}' has shape .* config.json implies"):
        load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file)
    with pytest.raises(ModelError, match="missing 1 tensor.*'model.norm.weight'"):
        load_model(model_dir)


def test_untied_model_without_lm_head_is_refused(tmp_path):
    path = tmp_path / "m"
    build_hf_model("qwen2").save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelError, match="'lm_head.weight'"):
        load_model(path)


def test_token_out_of_vocab_names_the_token_and_position(model_dir):
    model, _ = load_model(model_dir)
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = VOCAB + 7
    with pytest.raises(
        ModelError, match=rf"token id {VOCAB + 7} at row 1, position 3 .* 0..{VOCAB - 1}"
    ):
        model(ids)
    ids[1, 3] = -1
    with pytest.raises(ModelError, match="token id -1"):
        model(ids)


def test_sequence_longer_than_context(model_dir):
    model, _ = load_model(model_dir)
    limit = model.config.max_context
    with pytest.raises(
        ModelError, match=f"sequence of {limit + 1} tokens exceeds the model's context of {limit}"
    ):
        model(torch.zeros(1, limit + 1, dtype=torch.long))
    with pytest.raises(ModelError, match="exceeds the model's context"):
        model.new_caches(1, limit + 8)


def test_sliding_window_and_other_rope_types_are_refused(model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    _edit_config(model_dir, use_sliding_window=True)
    with pytest.raises(ModelError, match="use_sliding_window"):
        load_model(model_dir)
    _edit_config(copy, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ModelError, match="rope type 'yarn' is not supported"):
        load_model(copy)
