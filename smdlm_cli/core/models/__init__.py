"""Loading and saving Denoisers: one entry point for run directories, model directories and hub names.

A model directory is `config.json` + `model.safetensors` (or shards with an index). Its
`model_type` picks the adapter: "mdlm" (keys with the `backbone.` prefix, the layout of
kuleshov-group/mdlm-owt and of smdlm's runs), "Dream" (Qwen2 key names, as Dream-org's
checkpoints) or "llada" (LLaDA's own key names, as GSAI-ML's checkpoints). A run, a downloaded checkpoint and a hub name all load through `load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from smdlm_cli.core import hub, validate
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_json, atomic_save_tensors, load_tensors
from smdlm_cli.core.models.dit import DiT, DiTConfig
from smdlm_cli.core.models.dream import Dream, DreamConfig
from smdlm_cli.core.models.llada import LLaDA, LLaDAConfig

ADAPTERS = {"mdlm": (DiTConfig, DiT), "dit": (DiTConfig, DiT), "dream": (DreamConfig, Dream),
            "llada": (LLaDAConfig, LLaDA)}
# Adapters of large checkpoints: built on the meta device, stored dtype kept, own key names.
LARGE = (Dream, LLaDA)

PREFIX = "backbone."
# Keys a model file may hold that are not the backbone's: the official SM TransparencyHead (read by
# checkpoint.load_softmask) and the rotary buffer, which is recomputed identically when absent.
TOLERATED_UNEXPECTED = ("tran_head.",)
TOLERATED_MISSING = ("rotary_emb.inv_freq",)


def resolve(path_or_name: str) -> Path:
    """A local directory as is; a hub name through the local HF cache (or a download when online)."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    if path.exists() or path_or_name.startswith((".", "/", "~")) or path_or_name.count("/") != 1:
        raise UserError(f"{path_or_name}: no such model directory; expected a run directory, an "
                        f"MDLM directory (config.json + model.safetensors) or a hub name")
    from huggingface_hub import snapshot_download

    return Path(hub.fetch("weights", path_or_name, lambda: snapshot_download(
        path_or_name, allow_patterns=["*.json", "*.safetensors"]),
        "a local model directory, or a hub name downloaded on a connected machine"))


def read_config(model_dir: Path) -> DiTConfig | DreamConfig | LLaDAConfig:
    file = model_dir / "config.json"
    if not file.exists():
        if (model_dir / "state").is_dir() and (model_dir / "recipe.toml").is_file():
            raise UserError(f"{model_dir}: no published model yet (the run stopped before its "
                            f"first save completed); resume it with `smdlm pretrain "
                            f"{model_dir / 'recipe.toml'} --out {model_dir} --resume`") from None
        raise UserError(f"{model_dir}: no config.json; expected a model directory") from None
    config = validate.read_json(file)
    kind = str(config.get("model_type", "mdlm")).lower()
    if kind not in ADAPTERS:
        raise UserError(f"{file}: model_type {config.get('model_type')!r} is not supported; "
                        f"expected mdlm (MDLM DiT), Dream or llada")
    return ADAPTERS[kind][0].from_json(config, str(file))


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index lists, prefix stripped."""
    validate.refuse_pickled(model_dir, "model")
    index = model_dir / "model.safetensors.index.json"
    files = [model_dir / "model.safetensors"]
    if index.exists():
        shards = validate.read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(f, str) for f in shards.values()):
            raise UserError(f"{index}: weight_map is not an object of file names; expected a "
                            f"safetensors index")
        files = sorted({model_dir / f for f in shards.values()})
    tensors = {}
    for f in files:
        try:
            tensors.update(load_tensors(f))
        except FileNotFoundError:
            raise UserError(f"{f}: missing; expected the model's safetensors weights") from None
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
    for name, t in tensors.items():  # NaN weights decode to garbage (or nothing) without a word
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{model_dir}: weight {name} holds NaN or infinite values; the model "
                            f"is broken (a diverged run?); expected finite weights")
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_state_into(model: nn.Module, path_or_name: str) -> dict[str, list[str]]:
    """Copy the weights of a model directory into `model`; returns the missing and unexpected keys.

    Shapes must match wherever names do; tolerated extras (the rotary buffer, tran_head.*) are
    left out of the report's "missing" list but kept in "unexpected" so callers can see them.
    """
    model_dir = resolve(path_or_name)
    weights = read_weights(model_dir)
    own = model.state_dict()
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise UserError(f"{model_dir}: {k} has shape {tuple(v.shape)}, the model expects "
                            f"{tuple(own[k].shape)}")
    result = model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if k not in TOLERATED_MISSING]
    unexpected = sorted(k for k in weights if k not in own)
    return {"missing": missing, "unexpected": unexpected}


def load_model(path_or_name: str, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, weights: bool = True) -> DiT | Dream | LLaDA:
    """The Denoiser stored at a run directory, a model directory or a hub name.

    With weights=False only the architecture is built (the caller loads and reports keys itself).
    Any backbone key that is missing or unknown is an error: a silently half-loaded model would
    train or sample garbage. Dream and LLaDA models keep their stored dtype unless `dtype` says
    otherwise.
    """
    model_dir = resolve(path_or_name)
    if not (model_dir / "config.json").exists() and (model_dir / "adapter").is_dir():
        return _load_adapted(model_dir, device, dtype)
    config = read_config(model_dir)
    if isinstance(config, DreamConfig):
        return _load_large(Dream, model_dir, config, device, dtype, weights)
    if isinstance(config, LLaDAConfig):
        return _load_large(LLaDA, model_dir, config, device, dtype, weights)
    model = DiT(config)
    if weights:
        report = load_state_into(model, str(model_dir))
        extra = [k for k in report["unexpected"] if not k.startswith(TOLERATED_UNEXPECTED)]
        if report["missing"] or extra:
            raise UserError(f"{model_dir}: weights do not match config.json (missing "
                            f"{report['missing'][:3]}, unexpected {extra[:3]})")
    return model.to(device=device, dtype=dtype)


def _load_large(cls, model_dir: Path, config, device, dtype, weights: bool) -> Dream | LLaDA:
    """Built on the meta device and filled with the stored tensors: a 7B/8B model never exists
    twice (or in fp32) in memory."""
    if not weights:
        return cls(config).to(device=device, dtype=dtype)
    tensors = read_weights(model_dir)
    with torch.device("meta"):
        model = cls(config)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    dream_tied = cls is Dream and config.tie_word_embeddings
    if dream_tied:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not match config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise UserError(f"{model_dir}: {k} has shape {tuple(v.shape)}, config.json implies "
                            f"{tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if dream_tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype)


def _load_adapted(run_dir: Path, device, dtype) -> nn.Module:
    """A fine-tuning run without a merged model: its base (base.json) with adapter/ merged in."""
    from peft import PeftModel

    try:
        base = json.loads((run_dir / "base.json").read_text())["path"]
        if not isinstance(base, str):
            raise TypeError(base)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{run_dir}: has adapter/ but no readable base.json naming its base model; "
                        f"expected a run directory written by smdlm finetune") from None
    adapter = run_dir / "adapter"
    validate.refuse_pickled(adapter, "adapter", "adapter_model.safetensors")
    if not (adapter / "adapter_model.safetensors").is_file():  # peft would look for a pickle next
        raise UserError(f"{adapter}: no adapter_model.safetensors; expected the adapter smdlm "
                        f"finetune writes")
    inside = run_dir / base  # a base the run holds is named relative to the run
    model = load_model(str(inside) if inside.is_dir() else base, device=device, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def save_model(model: DiT | Dream | LLaDA, out_dir: str | Path) -> None:
    """config.json + model.safetensors, each written atomically: a DiT with `backbone.*` keys in
    fp32 (as MDLM-OWT), a Dream or LLaDA model with its own key names in its own dtype."""
    out_dir = Path(out_dir)
    if isinstance(model, LARGE):
        tied = isinstance(model, Dream) and model.config.tie_word_embeddings
        tensors = {k: v for k, v in model.state_dict().items()
                   if not (tied and k == "lm_head.weight")}
    else:
        tensors = {PREFIX + k: v.float() for k, v in model.state_dict().items()}
    atomic_save_tensors(out_dir / "model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(out_dir / "config.json", model.config.to_json())
