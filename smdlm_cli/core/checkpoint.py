"""Run directories: what a training run leaves behind, and how to read it back or resume it.

    runs/NAME/
      recipe.toml            the resolved recipe (written by the command that started the run)
      config.json            model config, MDLM-HF key names (kuleshov-group/mdlm-owt layout)
      model.safetensors      backbone.* weights: the EMA weights when EMA is on (what sampling uses)
      softmask.json          omega values + raw parameters + k (SM runs only)
      transparency_config.json   the same omega in the official code's key names
      tokenizer/             the tokenizer, mask token included
      metrics.jsonl          one JSON object a line
      state/latest           name of the newest state whose model is published
      state/step-NNNNNNN/    raw weights, EMA, optimizer, trainer.json: everything for exact resume
                             (under FSDP: weights.rankR.safetensors etc., each rank's shards)

Every file is written atomically (temporary name, then rename). A save writes the state
directory (trainer.json last), then publishes the model, then switches `state/latest`; the newest
state with a trainer.json is the one resumed, so a process killed at any moment leaves a run that
resumes (and republishes), and a model that loads once one save has completed. Safetensors and
JSON only: nothing is ever unpickled.
Not here: the training loop (trainer.py) or model architectures (models/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from smdlm_cli.core import validate
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import (atomic_save_tensors, atomic_write_json, atomic_write_text,
                               load_tensors)
from smdlm_cli.core.softmask import SoftMask

STATE = "state"


# --- the published model ----------------------------------------------------------------------
def save_softmask(run_dir: Path, softmask: SoftMask) -> None:
    atomic_write_json(run_dir / "softmask.json", softmask.to_dict())
    atomic_write_json(run_dir / "transparency_config.json", softmask.to_official())


def load_softmask(path: str | Path) -> SoftMask | None:
    """SoftMask from a run directory (softmask.json, else transparency_config.json) or a JSON file.

    None when the run has no soft-masking (a binary run, or an official binary config).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("softmask.json", "transparency_config.json"):
            if (path / name).exists():
                path = path / name
                break
        else:
            return None
    if not path.exists():
        raise UserError(f"softmask file not found: {path}")
    d = validate.read_json(path)
    if d.get("transparency_alg") == "none":
        return None
    return SoftMask.from_dict(d, source=str(path))


def find_latest_run(root: str | Path = "runs") -> Path:
    """The most recently written run directory under `root` (by its model.safetensors)."""
    root = Path(root)
    runs = [p.parent for p in root.glob("*/model.safetensors")]
    if not runs:
        raise UserError(f"no run found under {root}/: train one first, e.g. "
                        f"`smdlm pretrain recipes/quickstart.toml`, or pass --ckpt DIR")
    return max(runs, key=lambda p: (p / "model.safetensors").stat().st_mtime)


# --- resumable training state -------------------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = _local(val)
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP), contiguous for safetensors; a plain tensor as is."""
    return t.to_local().contiguous() if hasattr(t, "to_local") else t


def _name(base: str, shard: int | None) -> str:
    """weights.safetensors, or weights.rank3.safetensors for rank 3's shards under FSDP."""
    return f"{base}.safetensors" if shard is None else f"{base}.rank{shard}.safetensors"


def state_path(run_dir: Path, step: int) -> Path:
    return run_dir / STATE / f"step-{step:07d}"


def clear_state(state_dir: Path) -> None:
    """Remove a leftover of a run killed while writing this very step."""
    if state_dir.exists():
        shutil.rmtree(state_dir)


def save_tensors(state_dir: Path, weights: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None,
                 shard: int | None = None) -> dict:
    """The tensor files of a state (one rank's shards when `shard` is its rank); returns the
    optimizer's JSON part (param groups, non-tensor entries) for `seal_state`."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    atomic_save_tensors(state_dir / _name("weights", shard),
                        {k: _local(v) for k, v in weights.items()})
    atomic_save_tensors(state_dir / _name("optimizer", shard), opt_tensors)
    if ema is not None:
        atomic_save_tensors(state_dir / _name("ema", shard),
                            {k: _local(v) for k, v in ema.items()})
    return opt_meta


def seal_state(state_dir: Path, step: int, opt_meta: dict, trainer: dict) -> None:
    """optimizer.json, then trainer.json: written once every tensor file is, it marks the state
    complete (with "shards": N for a state saved as N ranks' shards)."""
    atomic_write_json(state_dir / "optimizer.json", opt_meta)
    atomic_write_json(state_dir / "trainer.json", {**trainer, "step": step})


def save_state(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None,
               trainer: dict) -> Path:
    """Write state/step-NNNNNNN/ completely; trainer.json, written last, marks it complete.

    The caller then publishes the model and calls `commit_state`. A state directory that fails
    half-way (disk full) is removed: the previous state and model stay as they were.
    """
    d = state_path(run_dir, step)
    clear_state(d)
    try:
        seal_state(d, step, save_tensors(d, weights, optimizer, ema), trainer)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def commit_state(run_dir: Path, state_dir: Path) -> None:
    """Point state/latest at a complete state whose model is published, then prune older ones."""
    state_root = run_dir / STATE
    atomic_write_text(state_root / "latest", state_dir.name + "\n")
    for old in sorted(state_root.glob("step-*"))[:-1]:
        if old.name != state_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def is_committed(run_dir: Path, state_dir: Path) -> bool:
    """Whether state/latest names `state_dir`, i.e. its model was published after it was saved."""
    pointer = run_dir / STATE / "latest"
    return pointer.exists() and pointer.read_text().strip() == state_dir.name


def latest_state(run_dir: Path) -> Path | None:
    """The newest complete state directory (with trainer.json), committed or not.

    A run killed after saving a state but before publishing its model resumes from that state
    (and publishes it again): the pointer state/latest only records what was published.
    """
    complete = [d for d in (run_dir / STATE).glob("step-*") if (d / "trainer.json").is_file()]
    return max(complete, key=lambda d: d.name) if complete else None


def load_state(state_dir: Path, device="cpu", shard: int | None = None) -> dict:
    """weights, optimizer state_dict, ema (or None) and the trainer dict of one state directory;
    with `shard`, that rank's local shards of a state saved under FSDP.

    A damaged file (cut short, hand-edited) is one UserError naming it, before anything is used.
    """
    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_tensors(state_dir / name, device)
        except Exception as e:  # SafetensorError, OSError: truncated, missing, not safetensors
            raise UserError(f"--resume: {state_dir / name} is damaged ({_first_line(e)}); "
                            f"expected the safetensors file a save writes") from None

    trainer_file, meta_file = state_dir / "trainer.json", state_dir / "optimizer.json"
    trainer = validate.read_json(trainer_file, f"--resume: {trainer_file}")
    for key, kind in (("step", int), ("forwards", int), ("tokens", int), ("loader", dict)):
        if not isinstance(trainer.get(key), kind):
            raise UserError(f"--resume: {trainer_file}: {key} = {trainer.get(key)!r}; expected "
                            f"{'an integer' if kind is int else 'an object'}")
    meta = validate.read_json(meta_file, f"--resume: {meta_file}")
    if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("scalars"), dict):
        raise UserError(f"--resume: {meta_file}: expected param_groups (a list) and scalars (an "
                        f"object)")
    ema_path = state_dir / _name("ema", shard)
    try:
        optimizer = _unflatten_optimizer(tensors(_name("optimizer", shard)), meta)
    except ValueError as e:
        raise UserError(f"--resume: {meta_file}: unexpected entry ({e})") from None
    return {
        "weights": tensors(_name("weights", shard)),
        "optimizer": optimizer,
        "ema": tensors(ema_path.name) if ema_path.exists() else None,
        "trainer": trainer,
    }


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics lines written after `step` (by a run killed before its next checkpoint)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int) \
                and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(run_dir: Path, record: dict) -> None:
    # Appends are not atomic, but a torn last line is dropped by truncate_metrics on resume.
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
