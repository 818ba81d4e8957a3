"""Corpora and packing: splits are disjoint and stable, blocks are MDLM's, the loader resumes."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from smdlm_cli.core import data
from smdlm_cli.core.config import DataConfig
from smdlm_cli.core.data import BlockLoader, build_corpus, iter_documents, pack_blocks, valid_batches
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok():
    return train_bpe(iter_documents(DataConfig(max_docs=20), "train"), 400)


def test_stdlib_split_is_by_file_disjoint_and_stable():
    cfg = DataConfig(valid_fraction=0.1)
    train, valid = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "valid"))
    files = data.stdlib_files()
    assert len(files) > 500 and len(train) + len(valid) == len(files)
    assert 0.05 < len(valid) / len(files) < 0.15
    root = Path(sysconfig.get_paths()["stdlib"])
    held_out = {p for p in files if data._is_valid(str(p.relative_to(root)), 0.1)}
    texts = {p: p.read_text(errors="replace") for p in files}
    # whole files, by path hash, in sorted order; train is exactly the rest
    assert valid == [texts[p] for p in files if p in held_out]
    assert train == [texts[p] for p in files if p not in held_out]
    assert list(iter_documents(cfg, "valid")) == valid
    assert list(iter_documents(DataConfig(valid_fraction=0.1, max_docs=7), "train")) == train[:7]
    assert all("site-packages" not in str(p) for p in data.stdlib_files())


def test_blocks_are_bos_chunk_eos_of_the_document_stream(tok):
    docs = ["def f(x):\n    return x\n" * 5, "import os\n", "class A:\n    pass\n" * 9]
    blocks = pack_blocks(docs, tok, 16, batch=2)
    assert blocks.dtype == torch.int32 and blocks.shape[1] == 16
    assert (blocks[:, 0] == tok.bos_token_id).all() and (blocks[:, -1] == tok.eos_token_id).all()
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.shape[0] == len(stream) // 14  # the tail is dropped
    assert blocks[:, 1:-1].flatten().tolist() == stream[: blocks.shape[0] * 14]


def test_corpus_is_cached(tok, tmp_path, monkeypatch):
    cfg = DataConfig(max_docs=15, valid_fraction=0.2)
    train, valid = build_corpus(cfg, tok, 32, tmp_path)
    assert train.shape[0] > 10 and valid.shape[0] > 0
    monkeypatch.setattr(data, "pack_blocks", lambda *a, **k: pytest.fail("re-tokenized"))
    train2, valid2 = build_corpus(cfg, tok, 32, tmp_path)
    assert torch.equal(train, train2) and torch.equal(valid, valid2)


def test_local_jsonl_and_txt_sources(tmp_path, tok):
    rows = [{"text": f"document number {i} " * 20, "id": i} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), valid_fraction=0.25)
    train, valid = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "valid"))
    assert sorted(train + valid) == sorted(r["text"] for r in rows) and valid
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(10):
        (txt / f"{i}.txt").write_text(f"text file {i}\n")
    docs = list(iter_documents(DataConfig(source=str(txt), valid_fraction=0.5), "train")) + \
        list(iter_documents(DataConfig(source=str(txt), valid_fraction=0.5), "valid"))
    assert sorted(docs) == sorted(f"text file {i}\n" for i in range(10))
    moved = tmp_path / "moved"
    shutil.copytree(txt, moved)  # the split hashes paths relative to the source
    assert list(iter_documents(DataConfig(source=str(moved), valid_fraction=0.5), "valid")) == \
        list(iter_documents(DataConfig(source=str(txt), valid_fraction=0.5), "valid"))
    with pytest.raises(UserError, match="no string field 'body'"):
        list(iter_documents(DataConfig(source=str(tmp_path / "c.jsonl"), text_field="body"), "train"))


def test_hub_dataset_offline_is_one_line_error():
    with pytest.raises(UserError, match="data.source 'openwebtext': not found locally and the hub is unreachable") as e:
        list(iter_documents(DataConfig(source="openwebtext"), "train"))
    assert "\n" not in str(e.value)


def test_too_little_text_is_named(tok, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="too little training text"):
        build_corpus(DataConfig(source=str(tmp_path / "a.txt")), tok, 64, tmp_path / "cache")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):  # plenty of training text, validation files far too short for a block
        name = f"{i}.txt"
        short = data._is_valid(name, 0.3)
        (docs / name).write_text("x" if short else "def f(x):\n    return x\n" * 40)
    with pytest.raises(UserError, match="'.*docs'.*too little validation text for one block of 64"):
        build_corpus(DataConfig(source=str(docs), valid_fraction=0.3), tok, 64, tmp_path / "cache")


def rows(n=23, length=4):
    return torch.arange(n * length, dtype=torch.int32).view(n, length)


def test_loader_visits_each_row_once_per_epoch():
    loader = BlockLoader(rows(), 5, seed=3)
    seen = torch.cat([loader.next_batch() for _ in range(4)])  # 20 of 23: the tail is dropped
    assert seen.dtype == torch.int64 and len(set(seen[:, 0].tolist())) == 20
    assert loader.next_batch().shape == (5, 4) and loader.state_dict()["epoch"] == 1


def test_ranks_partition_each_global_batch():
    single = BlockLoader(rows(), 6, seed=1)
    ranks = [BlockLoader(rows(), 3, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()
        a, b = (r.next_batch() for r in ranks)
        assert torch.equal(a, whole[0::2]) and torch.equal(b, whole[1::2])


def test_loader_resumes_exactly():
    a = BlockLoader(rows(), 4, seed=9)
    for _ in range(7):
        a.next_batch()
    b = BlockLoader(rows(), 4, seed=9)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(10):
        assert torch.equal(a.next_batch(), b.next_batch())
    with pytest.raises(UserError, match="cannot fill a batch of 24"):
        BlockLoader(rows(), 12, seed=0, world=2)


def test_valid_batches_are_fixed_and_global():
    """The same batches for any number of ranks: validation shards rows only after the noise."""
    batches = valid_batches(rows(10), 4, 3)  # 10 rows: only 2 batches of 4
    assert [b[:, 0].tolist() for b in batches] == [[0, 4, 8, 12], [16, 20, 24, 28]]
    assert len(valid_batches(rows(3), 4, 5)) == 1  # fewer rows than a batch: one short batch
