"""The LLaDA adapter: its key names and config, loaded from sharded safetensors as an 8B checkpoint,
checked against a direct computation; padding, embeddings, cache windows, checkpointing."""

import json

import pytest
import torch

from llada_fixtures import CONFIG, random_llada, reference_logits, write_checkpoint
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import load_model, save_model
from smdlm_cli.core.models.cache import KVCache
from smdlm_cli.core.models.llada import LLaDA
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.softmask import SoftMask

V = CONFIG["vocab_size"]


def test_key_names_are_llada_s():
    keys = set(random_llada().state_dict())
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight",
            "model.transformer.ff_out.weight"} <= keys
    block = {k.split("blocks.1.")[1] for k in keys if ".blocks.1." in k}
    assert block == {f"{m}.weight" for m in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out",
                                             "ff_norm", "ff_proj", "up_proj", "ff_out")}


def test_sharded_checkpoint_loads_and_equals_the_direct_computation(tmp_path):
    model = random_llada().double()
    path = write_checkpoint(model, tmp_path / "llada", dtype=torch.float64)
    loaded = load_model(str(path))
    assert isinstance(loaded, LLaDA) and loaded.mask_id == 90 and loaded.vocab_size == 96
    assert loaded.config.model_length == 128 and loaded.embedding_weight().dtype == torch.float64
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        out = loaded(input_ids=x)
        torch.testing.assert_close(out, reference_logits(model.state_dict(), model.config, x))
        # bidirectional, and no shift: the last token changes row 2; row l sees token l itself
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % V
        assert not torch.allclose(out[:, 2], loaded(input_ids=y)[:, 2])


def test_grouped_query_attention_and_tied_output(tmp_path):
    model = random_llada(n_kv_heads=2, weight_tying=True).double()
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    loaded = load_model(str(write_checkpoint(model, tmp_path / "gqa", dtype=torch.float64)))
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x),
                                   reference_logits(model.state_dict(), model.config, x))


def test_bf16_checkpoint_is_built_on_meta_and_keeps_its_dtype(tmp_path):
    model = random_llada()
    loaded = load_model(str(write_checkpoint(model, tmp_path / "bf16")))
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in loaded.parameters())
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        out = loaded(input_ids=x)
        ref = reference_logits({k: v.double() for k, v in loaded.state_dict().items()},
                               model.config, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.05)
    as_f32 = load_model(str(tmp_path / "bf16"), dtype=torch.float32)
    assert as_f32.embedding_weight().dtype == torch.float32


def test_padded_rows_equal_rows_alone_and_embeds_equal_ids():
    model = random_llada().double()
    x = torch.randint(0, V, (3, 10))
    keep = torch.ones(3, 10, dtype=torch.long)
    keep[1, 7:] = 0                      # right padding
    keep[2, :4] = 0                      # left padding, positions from the first real token
    pos = (keep.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(input_ids=x, attention_mask=keep, position_ids=pos)
        assert torch.isfinite(batch).all()  # pad queries still attend: no NaN rows
        torch.testing.assert_close(batch[0], model(input_ids=x[:1])[0])
        torch.testing.assert_close(batch[1, :7], model(input_ids=x[1:2, :7])[0])
        torch.testing.assert_close(batch[2, 4:], model(input_ids=x[2:, 4:])[0])
        ref = reference_logits(model.state_dict(), model.config, x, keep, pos)
        torch.testing.assert_close(batch[keep.bool()], ref[keep.bool()])
        emb = model.embedding_weight()[x]
        torch.testing.assert_close(model(inputs_embeds=emb), model(input_ids=x))


def test_cache_windows_equal_the_full_forward():
    model = random_llada().double()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        full = model(input_ids=x)
        cache = model.empty_cache()
        assert isinstance(cache, KVCache)
        torch.testing.assert_close(model(input_ids=x, cache=cache.window(0, 16)), full)
        torch.testing.assert_close(model(input_ids=x[:, 6:], cache=cache.window(6, 16)), full[:, 6:])
        torch.testing.assert_close(model(input_ids=x[:, 6:10], cache=cache.window(6, 10)), full[:, 6:10])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("use_sm", [False, True], ids=["binary", "sm"])
def test_cached_decoding_refreshed_every_step_equals_uncached(cache, use_sm):
    model = random_llada().double()
    g = torch.Generator().manual_seed(0)
    lengths, gen = (5, 9, 3), 16
    x = torch.full((3, 9 + gen), 0, dtype=torch.long)
    am = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randint(1, 89, (n,), generator=g)
        x[b, n:n + gen] = model.mask_id
        am[b, :n + gen] = 1
    sm = SoftMask(k=2, scale=0.9, centre=-3.0, steepness=3.0).double() if use_sm else None
    kw = dict(sampler="confidence", steps=8, generator_seeds=[0, 1, 2], attention_mask=am,
              block_length=8, softmask=sm, temperature=0.5)
    plain = decode(model, x, **kw)
    cached = decode(model, x, cache=cache, refresh_every=1, **kw)
    assert torch.equal(cached.tokens, plain.tokens) and cached.nfe == plain.nfe == 8
    assert not (cached.tokens == model.mask_id).any()
    assert torch.equal(cached.tokens[am == 0], x[am == 0])   # padding untouched
    alone = decode(model, x[1:2, :9 + gen], **{**kw, "generator_seeds": [1], "attention_mask": None})
    assert torch.equal(alone.tokens[0], plain.tokens[1])     # a batch row decodes as alone


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, V, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = random_llada().train()
        model.gradient_checkpointing = ckpt
        model(input_ids=x).pow(2).mean().backward()
        grads.append(model.model.transformer.blocks[0].q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_save_and_load_round_trip(tmp_path):
    model = random_llada()
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llada" and config["mask_token_id"] == 90
    assert config["d_model"] == 32 and config["activation_type"] == "silu"
    again = load_model(str(tmp_path / "m"))
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x), model(input_ids=x))


def test_mask_id_defaults_to_llada_s(tmp_path):
    path = write_checkpoint(random_llada(vocab_size=126464, embedding_size=None, d_model=8,
                                         n_heads=2, n_kv_heads=2, mlp_hidden_size=8, n_layers=1),
                            tmp_path / "big-vocab", shards=1)
    config = json.loads((path / "config.json").read_text())
    del config["mask_token_id"]
    (path / "config.json").write_text(json.dumps(config))
    assert load_model(str(path)).mask_id == 126336


def test_broken_checkpoints_are_one_line_errors(tmp_path):
    path = write_checkpoint(random_llada(), tmp_path / "l")
    config = json.loads((path / "config.json").read_text())
    for change, message in (({"n_layers": 3}, "weights do not match config.json .*blocks.2"),
                            ({"mlp_hidden_size": 40}, "has shape"),
                            ({"scale_logits": True}, "scale_logits = True is not supported"),
                            ({"activation_type": "gelu"}, "activation_type = 'gelu' is not supported")):
        (path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            load_model(str(path))
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "d_model"}))
    with pytest.raises(UserError, match="missing d_model; expected a LLaDA config.json"):
        load_model(str(path))
    with pytest.raises(UserError, match="weights 'GSAI-ML/LLaDA-8B-Instruct': not found locally"):
        load_model("GSAI-ML/LLaDA-8B-Instruct")


def test_tokenizer_holding_llada_s_mask_uses_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from smdlm_cli.core.tokenizer import load_tokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<|mdm_mask|>": 2, "a": 3, "b": 4}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|startoftext|>",
                                  eos_token="<|endoftext|>",
                                  additional_special_tokens=["<|mdm_mask|>"])
    assert tok.mask_token is None                     # as LLaDA's: held, not declared
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.mask_token == "<|mdm_mask|>" and loaded.mask_token_id == 2 and len(loaded) == 5
