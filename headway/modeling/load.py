"""Load and save Hugging Face model directories.

A directory holds `config.json`, `model.safetensors` or a sharded
`model.safetensors.index.json`, and (optionally here) the tokenizer files. The model is
built on the meta device and the checked tensors are assigned into it, so loading costs
one read of the weights and no random initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from headway.modeling.config import ModelConfig
from headway.modeling.errors import ModelError
from headway.modeling.families import model_class
from headway.modeling.model import Transformer
from headway.modeling.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HF_PREFIX = "model."  # HF nests the body under `model.`; we keep it at the top level
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a Hugging Face directory; tokenizer is None without tokenizer.json.

    The model is in eval mode with gradients enabled on its parameters.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory; pass a Hugging Face model directory")
    config = ModelConfig.from_file(path)
    model = build_model(config, read_weights(path, empty_model(config), dtype, device))
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None and not tokenizer.eos_token_ids and config.eos_token_id is not None:
        eos = config.eos_token_id
        tokenizer.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    return model.eval(), tokenizer


def empty_model(config: ModelConfig) -> Transformer:
    """A model of `config`'s family (families.py) on the meta device: the shapes, no memory."""
    with torch.device("meta"):
        return model_class(config.model_type)(config)


def build_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A model whose parameters ARE the tensors of `state` (our names; shared, not copied).

    Sharing is what lets many LoRA forks of one base hold one copy of its weights.
    """
    model = empty_model(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = model.inv_freq.to(state["embed_tokens.weight"].device)
    return model.eval()


def from_hf_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for tensors saved under Hugging Face names (see `hf_state_dict`)."""
    return {k.removeprefix(_HF_PREFIX): v for k, v in tensors.items()}


def weight_files(path: Path) -> dict[str, Path]:
    """Map tensor name → safetensors file, from the index or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"{index}: not a valid index (needs a 'weight_map'): {e}") from e
        return {name: path / file for name, file in weight_map.items()}
    single = path / WEIGHTS_FILE
    if not single.is_file():
        raise ModelError(
            f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}; save the weights in safetensors format"
        )
    return {name: single for name in _keys(single)}


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for truncated headers
        raise ModelError(f"{file}: cannot read safetensors (truncated or corrupt?): {e}") from e


def read_weights(
    path: Path,
    model: Transformer,
    dtype: torch.dtype,
    device: str | torch.device,
    load: bool = True,
) -> dict[str, torch.Tensor]:
    """Checked tensors for `model` (our names, `dtype`, `device`) from the directory `path`.

    `load=False` checks names and shapes from the file headers only and returns {}: a
    cheap validation of a large model directory.
    """
    files = weight_files(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, names in by_file.items():
        if not file.is_file():
            raise ModelError(f"{file}: listed in {INDEX_FILE} but missing; restore the shard")
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in names:
                    name = model.config.our_weight_name(key)
                    if (
                        name is None
                        or name.endswith(_IGNORED)
                        or (name == "lm_head.weight" and model.config.tie_word_embeddings)
                    ):
                        continue
                    if name not in expected:
                        raise ModelError(
                            f"{file}: unexpected tensor {key!r}; the weights do not match "
                            f"config.json's {model.config.model_type} architecture"
                        )
                    shape = f.get_slice(key).get_shape()
                    if tuple(shape) != tuple(expected[name]):
                        raise ModelError(
                            f"{file}: tensor {key!r} has shape {list(shape)} but "
                            f"config.json implies {list(expected[name])}; the config and "
                            "weights do not belong together"
                        )
                    seen.add(name)
                    if load:
                        state[name] = f.get_tensor(key).to(dtype)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{file}: cannot read safetensors (truncated or corrupt?): {e}") from e
    missing = sorted(hf_name(n) for n in set(expected) - seen)
    if missing:
        raise ModelError(
            f"{path}: weights are missing {len(missing)} tensor(s), e.g. {missing[0]!r}"
        )
    return state


def hf_name(name: str) -> str:
    """Hugging Face's name of one of our tensors (the body sits under `model.`)."""
    return name if name == "lm_head.weight" else _HF_PREFIX + name


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (tied lm_head omitted, as HF saves it)."""
    return {
        hf_name(name): tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    }


def save_model(model: Transformer, tokenizer: Tokenizer | None, path: str | Path) -> None:
    """Write `model` (and `tokenizer`) as a Hugging Face directory transformers loads."""
    if getattr(model, "lora_config", None) is not None:
        raise ModelError("merge or drop the LoRA adapter before saving full weights (merge_lora)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_state_dict(model), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    eos = tokenizer.eos_token_ids if tokenizer is not None else model.config.eos_token_id
    generation = {"eos_token_id": eos, "bos_token_id": model.config.bos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
