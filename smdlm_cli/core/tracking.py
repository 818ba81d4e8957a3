"""Experiment trackers: the records of metrics.jsonl, also sent to TensorBoard and/or Weights & Biases.

`train.trackers` names them. metrics.jsonl is always written by the trainer (resume and the
reports read it), so "jsonl" adds nothing here; "tensorboard" and "wandb" are optional extras
(`pip install smdlm[tracking]`), checked by `check` before any rank starts so a missing one is a
one-line error and never a hang. Every tracker offers the same four calls: scalars (one record),
a figure, a Markdown table, close. Only rank 0 builds one (commands/training.py).

Names: a training record's numbers go to `train/<key>`, a validation record's to `val/<key>`, the
ω values to `softmask/<key>`; the step is the record's own.

Not here: what is recorded (core/trainer.py) or how the λ(H) figure is drawn (inspect_lambda.py).
"""

from __future__ import annotations

import importlib.util
import math
import os
import uuid
from pathlib import Path

from smdlm_cli.core.errors import UserError

TRACKERS = ("jsonl", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
SOFTMASK_KEYS = ("scale", "centre", "steepness")
NOT_SCALARS = ("step",)


def check(names: list[str], what: str = "train.trackers") -> list[str]:
    """The trackers beyond metrics.jsonl, each importable; else a UserError naming the package."""
    extra = []
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{what}: unknown tracker {name!r}; expected one of {', '.join(TRACKERS)}")
        if name == "jsonl" or name in extra:
            continue
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"{what}: {name} is not installed; pip install {PACKAGES[name]} "
                            f"(or pip install 'smdlm[tracking]')")
        extra.append(name)
    return extra


def scalars(record: dict) -> dict[str, float]:
    """A metrics record as tracker names -> numbers (bools as 0/1; non-finite values dropped)."""
    section = "val" if "val_nll" in record else "train"
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            out[f"softmask/{key}" if key in SOFTMASK_KEYS else f"{section}/{key}"] = value
    return out


class TensorBoard:
    def __init__(self, log_dir: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.writer.add_figure(tag, fig, step, close=False)

    def table(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One wandb run per run directory: its id is kept in DIR/wandb-id, so a resume continues it."""

    def __init__(self, log_dir: Path, name: str):
        import wandb

        self.wandb = wandb
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "smdlm"), name=name,
                              id=run_id, resume="allow", dir=str(log_dir), reinit=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.run.log({tag: self.wandb.Image(fig)}, step=step)

    def table(self, tag: str, markdown: str, step: int) -> None:
        header, _, *rows = [line for line in markdown.splitlines() if line.startswith("|")]
        cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
        self.run.log({tag: self.wandb.Table(columns=cells(header), data=[cells(r) for r in rows])},
                     step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB}


class Trackers:
    """The chosen trackers behind one interface; with none it does nothing."""

    def __init__(self, names: list[str], log_dir: Path, name: str):
        self.all = [KINDS[n](Path(log_dir) / n, name) for n in check(names)]

    def record(self, record: dict) -> None:
        """One metrics.jsonl record, named as the module docstring says."""
        self.scalars(scalars(record), record["step"])

    def scalars(self, values: dict[str, float], step: int) -> None:
        for t in self.all:
            t.scalars(values, step)

    def figure(self, tag: str, fig, step: int) -> None:
        for t in self.all:
            t.figure(tag, fig, step)

    def table(self, tag: str, markdown: str, step: int = 0) -> None:
        for t in self.all:
            t.table(tag, markdown, step)

    def close(self) -> None:
        for t in self.all:
            t.close()

    def __bool__(self) -> bool:
        return bool(self.all)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
