"""The DiT: MDLM's parameter names and count, its forward computation, and the directory format."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_save_tensors, load_tensors
from smdlm_cli.core.models import load_model, load_state_into, save_model
from smdlm_cli.core.models.dit import DiTConfig, build_dit

V, L = 50, 12


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_dit("tiny", V, V - 1, L, hidden_dim=32, n_blocks=2, n_heads=4, cond_dim=16,
                      dropout=0.0, **kw)
    for name, p in model.named_parameters():  # MDLM zero-inits the gates; make every path count
        torch.nn.init.normal_(p, std=0.2 if "adaLN" in name else 0.1)
    return model.eval()


def test_small_preset_is_mdlm_owt():
    with torch.device("meta"):
        model = build_dit("small", 50258, 50257, 1024)
    assert sum(p.numel() for p in model.parameters()) == 169_627_218  # reference §1.1
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 131  # 130 parameters + the rotary buffer, as in the checkpoint
    assert shapes["vocab_embed.embedding"] == (50258, 768)
    assert shapes["rotary_emb.inv_freq"] == (32,)
    assert shapes["blocks.11.attn_qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.mlp.2.bias"] == (768,)
    assert shapes["blocks.0.adaLN_modulation.weight"] == (4608, 128)
    assert shapes["output_layer.linear.bias"] == (50258,)
    assert shapes["output_layer.adaLN_modulation.weight"] == (1536, 128)
    assert "blocks.0.attn_qkv.bias" not in shapes and "blocks.0.norm1.bias" not in shapes


def reference_forward(model, ids):
    """MDLM's DIT.forward written out from the reference notes (§1.2), loops and all."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, D = cfg.n_heads, cfg.hidden_dim
    dh = D // H
    h = sd["vocab_embed.embedding"][ids]
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.double) / 128)
    temb = torch.cat([torch.cos(0 * f), torch.sin(0 * f)])  # σ = 0
    c = F.silu(F.linear(F.silu(F.linear(temb, sd["sigma_map.mlp.0.weight"], sd["sigma_map.mlp.0.bias"])),
                        sd["sigma_map.mlp.2.weight"], sd["sigma_map.mlp.2.bias"]))

    def ln(x, w):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w

    pos = torch.arange(ids.shape[1], dtype=torch.double)
    inv = 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.double) / dh)
    cos, sin = torch.cos(pos[:, None] * inv), torch.sin(pos[:, None] * inv)

    def rope(x):  # x (B, L, H, dh)
        x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
        return torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], -1)

    for i in range(cfg.n_blocks):
        p = f"blocks.{i}."
        mod = F.linear(c, sd[p + "adaLN_modulation.weight"], sd[p + "adaLN_modulation.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6)
        a = ln(h, sd[p + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = a @ sd[p + "attn_qkv.weight"].T
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(*ids.shape, H, dh) for j in range(3))
        q, k = rope(q), rope(k)
        att = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(dh)
        o = torch.einsum("bhlm,bmhd->blhd", att.softmax(-1), v).reshape(*ids.shape, D)
        h = h + g1 * (o @ sd[p + "attn_out.weight"].T)
        m = ln(h, sd[p + "norm2.weight"]) * (1 + sc2) + sh2
        m = F.linear(F.gelu(F.linear(m, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]), approximate="tanh"),
                     sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
        h = h + g2 * m
    sh, sc = F.linear(c, sd["output_layer.adaLN_modulation.weight"],
                      sd["output_layer.adaLN_modulation.bias"]).chunk(2)
    h = ln(h, sd["output_layer.norm_final.weight"]) * (1 + sc) + sh
    return F.linear(h, sd["output_layer.linear.weight"], sd["output_layer.linear.bias"])


def test_forward_matches_the_reference_computation():
    model = tiny()
    ids = torch.randint(0, V, (3, L))
    got = model(ids)
    assert got.shape == (3, L, V) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_forward(model, ids), rtol=1e-4, atol=1e-4)


def test_inputs_embeds_path_equals_ids_path():
    model = tiny()
    ids = torch.randint(0, V, (2, L))
    torch.testing.assert_close(model(inputs_embeds=model.embedding_weight()[ids]), model(ids))


def test_padding_mask_hides_padded_keys():
    model = tiny()
    ids = torch.randint(0, V, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, :7], model(ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(padded)[:, :7], model(ids), atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        model.gradient_checkpointing = ckpt
        model(torch.arange(L)[None] % V).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_fresh_model_predicts_uniformly_like_mdlm():
    model = build_dit("tiny", V, V - 1, L, hidden_dim=32, n_blocks=1, n_heads=2, cond_dim=8)
    assert torch.count_nonzero(model(torch.zeros(1, L, dtype=torch.long))) == 0


def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_dim"] == 32 and config["mask_id"] == V - 1 and config["model_type"] == "mdlm"
    assert all(k.startswith("backbone.") for k in load_tensors(tmp_path / "model.safetensors"))
    loaded = load_model(str(tmp_path)).eval()
    ids = torch.randint(0, V, (2, L))
    assert torch.equal(loaded(ids), model(ids))


def write_hf_dir(path, model, drop=(), extra=None):
    """An MDLM-OWT-style directory: HF config keys (no mask_id), backbone.* safetensors."""
    tensors = {"backbone." + k: v for k, v in model.state_dict().items() if k not in drop}
    atomic_save_tensors(path / "model.safetensors", {**tensors, **(extra or {})})
    cfg = model.config
    (path / "config.json").write_text(json.dumps({
        "architectures": ["MDLM"], "auto_map": {"AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
        "model_type": "mdlm", "vocab_size": cfg.vocab_size, "model_length": cfg.model_length,
        "hidden_dim": cfg.hidden_dim, "cond_dim": cfg.cond_dim, "n_blocks": cfg.n_blocks,
        "n_heads": cfg.n_heads, "dropout": 0.1, "time_conditioning": False, "return_dict": False}))


def test_loads_an_hf_mdlm_directory(tmp_path):
    model = tiny()
    write_hf_dir(tmp_path, model, drop=("rotary_emb.inv_freq",),
                 extra={"tran_head.raw_scale": torch.tensor(-3.0)})
    loaded = load_model(str(tmp_path)).eval()
    assert loaded.mask_id == V - 1 and loaded.config.dropout == 0.1
    ids = torch.randint(0, V, (2, L))
    assert torch.equal(loaded(ids), model(ids))
    report = load_state_into(tiny(seed=1), str(tmp_path))
    assert report == {"missing": [], "unexpected": ["tran_head.raw_scale"]}


def test_mismatched_weights_are_one_line_errors(tmp_path):
    model = tiny()
    write_hf_dir(tmp_path, model, drop=("blocks.1.norm2.weight",))
    with pytest.raises(UserError, match="missing.*blocks.1.norm2.weight"):
        load_model(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_dim": 64}))
    with pytest.raises(UserError, match="shape"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name, message", [
    ("kuleshov-group/mdlm-owt", "hub is unreachable"),  # HF_HUB_OFFLINE=1 in conftest
    ("./no/such/dir", "no such model directory"),
])
def test_unavailable_weights_fail_fast(name, message):
    with pytest.raises(UserError, match=message):
        load_model(name)


def test_time_conditioning_is_refused():
    with pytest.raises(UserError, match="time_conditioning"):
        DiTConfig(vocab_size=V, model_length=L, hidden_dim=32, cond_dim=8, n_blocks=1, n_heads=2,
                  time_conditioning=True)
