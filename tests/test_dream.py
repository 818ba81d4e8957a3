"""The Dream adapter: Qwen2 layout, bidirectional, logits shifted by one, loaded from disk."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dream_fixtures import CONFIG, random_dream, write_checkpoint
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import load_model, save_model
from smdlm_cli.core.models.cache import KVCache
from smdlm_cli.core.models.dream import Dream


def qwen2_reference(model: Dream) -> Qwen2ForCausalLM:
    """transformers' Qwen2 with the same weights: the direct computation to compare with."""
    c = model.config
    q = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    q.load_state_dict(model.state_dict(), strict=True)
    return q.to(next(model.parameters()).dtype)


def reference_logits(q, x, keep=None):
    """Bidirectional (a 4-D mask: HF adds no causal mask then) and shifted, as Dream's consumers do."""
    B, L = x.shape
    keys = torch.ones(B, L, dtype=torch.bool) if keep is None else keep.bool()
    mask = keys[:, None, None, :].expand(B, 1, L, L)
    logits = q(input_ids=x, attention_mask=mask).logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def test_checkpoint_on_disk_loads_and_matches_qwen2_bidirectional(tmp_path):
    model = random_dream()
    path = write_checkpoint(model, tmp_path / "dream", dtype=torch.float32)
    loaded = load_model(str(path))
    assert isinstance(loaded, Dream) and loaded.mask_id == CONFIG["mask_token_id"]
    assert loaded.vocab_size == 96 and loaded.config.model_length == 128
    x = torch.randint(0, 93, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x), reference_logits(qwen2_reference(model), x))
        # bidirectional: changing the last token changes the first rows' logits
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 93
        assert not torch.allclose(loaded(input_ids=x)[:, 2], loaded(input_ids=y)[:, 2])


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    model = random_dream()
    loaded = load_model(str(write_checkpoint(model, tmp_path / "d")))
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, 93, (1, 8))
    with torch.no_grad():
        out = loaded(input_ids=x)
        ref = reference_logits(qwen2_reference(model.to(torch.bfloat16)), x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05, rtol=0.05)


def test_padded_rows_equal_unpadded_and_embeds_equal_ids():
    model = random_dream()
    x = torch.randint(0, 93, (2, 10))
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, 7:] = 0
    with torch.no_grad():
        batch = model(input_ids=x, attention_mask=pad)
        alone = model(input_ids=x[1:, :7])
        torch.testing.assert_close(batch[1, :7], alone[0])
        assert torch.isfinite(batch).all()  # pad queries still attend: no NaN rows
        emb = model.embedding_weight()[x]
        torch.testing.assert_close(model(inputs_embeds=emb), model(input_ids=x))


def test_cache_windows_equal_the_full_forward():
    model = random_dream()
    x = torch.randint(0, 93, (2, 16))
    with torch.no_grad():
        full = model(input_ids=x)
        cache = KVCache.empty(2)
        torch.testing.assert_close(model(input_ids=x, cache=cache.window(0, 16)), full)
        prefix = model(input_ids=x[:, 6:], cache=cache.window(6, 16))       # prefix cache
        torch.testing.assert_close(prefix[:, 1:], full[:, 7:])
        dual = model(input_ids=x[:, 6:10], cache=cache.window(6, 10))       # dual cache
        torch.testing.assert_close(dual[:, 1:], full[:, 7:10])
        # a changed window token is seen by the window, not by stale suffix keys
        y = x.clone()
        y[:, 8] = (y[:, 8] + 1) % 93
        changed = model(input_ids=y[:, 6:10], cache=cache.window(6, 10))
        assert not torch.allclose(changed[:, 1:], dual[:, 1:])


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 93, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = random_dream().train()
        model.gradient_checkpointing = ckpt
        model(input_ids=x).float().pow(2).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_save_and_load_round_trip(tmp_path):
    model = random_dream()
    save_model(model, tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["mask_token_id"] == 95
    x = torch.randint(0, 93, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x), model(input_ids=x))


def test_broken_checkpoints_are_one_line_errors(tmp_path):
    path = write_checkpoint(random_dream(), tmp_path / "d")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match="weights do not match config.json .*layers.2"):
        load_model(str(path))
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "mask_token_id"}))
    with pytest.raises(UserError, match="missing mask_token_id; expected a Dream config.json"):
        load_model(str(path))
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(UserError, match="has shape"):
        load_model(str(path))
    with pytest.raises(UserError, match="weights 'Dream-org/Dream-v0-Base-7B': not found locally and the hub is unreachable"):
        load_model("Dream-org/Dream-v0-Base-7B")


def test_mask_logit_setting_is_kept_in_config_and_checked(tmp_path):
    model = random_dream()
    assert model.mask_logit == "keep" and model.forward_every_step  # the official Dream code's
    save_model(random_dream(mask_logit="drop"), tmp_path / "drop")
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["mask_logit"] == "drop"
    assert load_model(str(tmp_path / "drop")).mask_logit == "drop"
    with pytest.raises(UserError, match="mask_logit = 'subs', expected one of drop, keep"):
        random_dream(mask_logit="subs")


@pytest.mark.parametrize("sampler,kw", [("confidence", {"alg": "entropy", "temperature": 0.0}),
                                        ("confidence", {"alg": "maskgit_plus", "temperature": 1.0}),
                                        ("mdlm", {})])
def test_a_kept_mask_column_is_never_decoded_to(sampler, kw):
    """[MASK] the best logit everywhere: it weighs in every confidence, but no position is ever
    committed to it, nor left masked by noise removal."""
    from smdlm_cli.core.samplers import decode
    from smdlm_cli.core.softmask import SoftMask

    model = random_dream()
    model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor([model.mask_id]),
                                        out.amax(-1, keepdim=True) + 3.0))
    x = torch.cat([torch.randint(0, 90, (2, 4)), torch.full((2, 12), model.mask_id)], 1)
    for sm in (None, SoftMask(k=3, scale=0.5)):
        out = decode(model, x, sampler=sampler, steps=6, softmask=sm, generator_seeds=[0, 1], **kw)
        assert not (out.tokens == model.mask_id).any()
