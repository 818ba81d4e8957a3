"""Tokenizers: the offline BPE is exact and lossless; HF tokenizers get MDLM's mask."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from smdlm_cli.core.data import stdlib_files
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.tokenizer import load_tokenizer, mask_token_id, train_bpe, vocab_size


@pytest.fixture(scope="module")
def texts():
    return [p.read_text(errors="replace") for p in stdlib_files()[:30]]


@pytest.fixture(scope="module")
def bpe(texts):
    return train_bpe(texts, 500)


def test_bpe_has_exactly_the_asked_vocabulary(bpe):
    assert vocab_size(bpe) == 500
    assert bpe.bos_token_id == bpe.eos_token_id == 0
    assert mask_token_id(bpe) == 1
    assert max(bpe.get_vocab().values()) == 499


def test_bpe_round_trips_python_source_losslessly(bpe, texts):
    for text in texts[:5] + ["déjà vu → λ = 0.5\t\n  x  ", "\x00\x7f emoji 🙂"]:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(ids) == text
        assert 1 not in ids  # text never encodes to the mask
    assert len(bpe(texts[0])["input_ids"]) < 0.7 * len(texts[0])  # it learned merges


def test_saved_bpe_loads_with_the_same_ids(bpe, texts, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded(texts[1])["input_ids"] == bpe(texts[1])["input_ids"]
    assert (vocab_size(loaded), mask_token_id(loaded), loaded.bos_token_id) == (500, 1, 0)


def test_a_too_small_corpus_is_a_user_error():
    with pytest.raises(UserError, match="data.vocab_size = 5000"):
        train_bpe(["tiny text"], 5000)


def test_a_tokenizer_without_mask_gets_one_appended(tmp_path):
    """As MDLM does for GPT-2: [MASK] becomes the next id (50257 there)."""
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert (mask_token_id(tok), vocab_size(tok)) == (3, 4)
    assert tok.bos_token_id == tok.eos_token_id == 0


@pytest.mark.parametrize("name, why", [("gpt2-no-such-model", "not found locally and the hub is unreachable"),
                                       ("./missing/dir", "no such file or directory")])
def test_unavailable_tokenizer_is_one_line(name, why):
    with pytest.raises(UserError, match=why) as e:
        load_tokenizer(name)
    assert "\n" not in str(e.value)


def test_a_corrupt_tokenizer_says_so_not_offline(tmp_path):
    """A broken local file is not a network problem: the message is the loader's own."""
    train_bpe(["def f(x):\n    return x\n"] * 20, 260).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(UserError, match="cannot be read") as e:
        load_tokenizer(str(tmp_path))
    assert "offline" not in str(e.value) and "\n" not in str(e.value)
