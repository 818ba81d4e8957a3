"""The one sharded, resumable loader behind pretraining blocks and fine-tuning batches.

Global batch n of epoch e is the slice [pos, pos + B·W) of a permutation seeded by (seed, e);
rank r of W takes its rows r::W, so the data a step sees does not depend on how it is split over
ranks, and `state_dict()` (epoch, position) is all a resume needs. The epoch's incomplete tail is
dropped. What a row becomes (a packed block, a collated SFT batch) is the subclass's `fetch`.

Not here: what the items are (data.py, sft.py).
"""

from __future__ import annotations

import torch

from smdlm_cli.core.errors import UserError


class ShardedLoader:
    what = "items"  # named in the error when the data cannot fill one batch

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n_items < batch_size * world:
            raise UserError(f"{n_items} {self.what} cannot fill a batch of {batch_size * world}; "
                            f"expected more data or a smaller train.batch_size")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_items, generator=g)

    def fetch(self, rows: list[int]):
        raise NotImplementedError

    def next_batch(self):
        span = self.batch_size * self.world
        if self.pos + span > self.n_items:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        rows = self._perm[self.pos: self.pos + span][self.rank:: self.world].tolist()
        batch = self.fetch(rows)
        self.pos += span
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


def validation_chunks(n_items: int, batch_size: int, n_batches: int) -> list[range]:
    """The first n_batches batches of items in order (one short batch when there are fewer items
    than a batch). The same on every rank and for any number of ranks: validation shards each
    batch's rows over the ranks only after drawing its noise (objectives.validate)."""
    if n_items == 0:
        raise UserError("no validation data; expected a larger corpus or data.valid_fraction > 0")
    chunks = [range(i, min(i + batch_size, n_items)) for i in range(0, n_items, batch_size)]
    return chunks[:max(1, min(n_batches, n_items // batch_size))]
