import pytest
import torch
from torch import nn

from perceptclip.core.tasks import TASKS, get_task
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.config import BackboneConfig
from perceptclip.model.debug import tiny_model, tiny_model_config
from perceptclip.model.lora import LoraAttention, LoraPair


def test_only_lora_and_head_parameters_are_trainable():
    model = tiny_model("emotion")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    assert all(".lora." in n or n.startswith("heads.") for n in trainable), trainable
    layers = model.cfg.backbone.vision["layers"]
    assert sum(".lora." in n for n in trainable) == layers * 3 * 2        # A and B for q, k, v per block
    assert not any(p.requires_grad for n, p in model.visual.named_parameters() if ".lora." not in n)
    assert set(model.trainable_state_dict()) == trainable


def test_every_attention_block_has_separate_q_k_v_pairs():
    model = tiny_model("iqa")
    attns = [m for m in model.visual.modules() if isinstance(m, LoraAttention)]
    assert len(attns) == model.cfg.backbone.vision["layers"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.visual.modules())
    pairs = attns[0].lora
    assert set(pairs) == {"q", "k", "v"} and pairs["q"].A is not pairs["k"].A
    assert pairs["q"].A.shape == (4, 64) and pairs["q"].B.shape == (64, 4)
    assert pairs["q"].scale == pytest.approx(8.0 / 4)


def test_lora_changes_only_its_third_of_the_fused_projection():
    model = tiny_model("iqa")
    attn = next(m for m in model.visual.modules() if isinstance(m, LoraAttention))
    with torch.no_grad():
        for name in "kv":
            attn.lora[name].B.zero_()
        before = attn.in_proj_weight.clone()
        attn.merge()
    delta = attn.in_proj_weight - before
    assert delta[:64].abs().max() > 0                                   # q third moved
    assert delta[64:].abs().max() == 0                                  # k and v untouched


def test_merged_and_unmerged_give_the_same_outputs():
    model = tiny_model("emotion", seed=3)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        merged = model.merge_lora()(x)
    assert not any(isinstance(m, LoraPair) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)


def test_base_attention_equals_open_clip_multihead_attention():
    """With B = 0 the adapted block computes exactly what open_clip's own block computes."""
    from perceptclip.model.clip_lora import build_vision_tower

    torch.manual_seed(0)
    cfg = tiny_model_config("iqa")
    plain = build_vision_tower(cfg.backbone).eval()
    adapted = ClipLoraModel(cfg, visual=build_vision_tower(cfg.backbone)).eval()
    adapted.visual.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted.embed(x), plain(x), rtol=1e-5, atol=1e-6)


def test_head_shapes_follow_the_paper():
    cfg = tiny_model_config("emotion")
    model = ClipLoraModel(cfg)
    linears = [m for m in model.heads["default"] if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32, 32), (32, 16), (16, 8)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_default_backbone_is_vit_l14_quickgelu_from_open_clip():
    cfg = BackboneConfig.from_open_clip("ViT-L-14-quickgelu")
    assert (cfg.embed_dim, cfg.quick_gelu, cfg.vision["width"], cfg.vision["layers"]) == (768, True, 1024, 24)
    assert cfg == BackboneConfig()
    with pytest.raises(ValueError, match="unknown open_clip model"):
        BackboneConfig.from_open_clip("ViT-Nope")
    with pytest.raises(ValueError, match="not an open_clip vision transformer"):
        BackboneConfig.from_open_clip("RN50")


def test_several_heads_share_one_backbone():
    model = tiny_model("iqa", heads=("koniq", "spaq"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x, head="koniq"), model(x, head="spaq"))
        torch.testing.assert_close(model(x), model(x, head="koniq"))


def test_tasks_registry():
    assert {t: (TASKS[t].head_size, TASKS[t].loss) for t in TASKS} == {
        "iqa": (1, "plcc"), "memorability": (1, "mse"), "emotion": (8, "cross_entropy")}
    assert get_task("emotion").labels[:3] == ("amusement", "awe", "contentment")
    with pytest.raises(ValueError, match="unknown task 'beauty'"):
        get_task("beauty")
