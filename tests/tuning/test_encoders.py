"""CLIP image encoder (transformers' CLIP vision tower; open_clip's where it imports) and the sequence encoder."""

from __future__ import annotations

import json

import pytest
import torch
from tuning_fixtures import TINY_CLIP, one_thread, write_tiny_clip_config

from mit.tuning.clip import CLIP_CONFIGS, _try_import_open_clip, build_clip_visual, default_feature_layers
from mit.tuning.encoders import CLIPImageEncoder, SequenceEncoder
from mit.tuning.heads import SegmentationDecoder

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_vit_l_14_336_shapes_on_meta():
    with torch.device("meta"):
        visual = build_clip_visual("ViT-L-14-336")
        embedding, levels = visual(torch.empty(1, 3, 336, 336), [7, 15, 23])
    assert (visual.grid_size, visual.width, visual.embed_dim) == ((24, 24), 1024, 768)
    assert embedding.shape == (1, 768)
    assert [tuple(f.shape) for f in levels] == [(1, 1024, 24, 24)] * 3
    assert default_feature_layers(24) == [7, 15, 23]
    assert sum(p.numel() for p in visual.parameters()) == 304_293_888  # open_clip's ViT-L-14-336 visual, the same net
    assert visual.tower.config.hidden_act == "quick_gelu"  # OpenAI's towers


def test_clip_image_encoder_tiny_config_and_refseg_decoder_shapes(tmp_path):
    path = write_tiny_clip_config(tmp_path)
    encoder = CLIPImageEncoder(path)
    assert (encoder.embed_dim, encoder.width, encoder.image_size, encoder.grid_size) == (16, 32, 32, (4, 4))
    assert encoder.feature_layers == [0, 1, 2] and encoder.backend == "transformers"
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.visual.training  # frozen: stays in eval mode
    features = encoder(torch.randn(2, 3, 32, 32))
    assert features.global_embedding.shape == (2, 16)
    assert [tuple(f.shape) for f in features.levels] == [(2, 32, 4, 4)] * 3
    assert not features.global_embedding.requires_grad
    decoder = SegmentationDecoder(24, encoder.width, len(encoder.feature_layers), 8)
    mask_logits = decoder(torch.randn(2, 24), features.levels, (32, 32))
    assert mask_logits.shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"feature_layers must be non-empty and in \[0, 3\)"):
        CLIPImageEncoder(path, feature_layers=[5])


def test_configs_and_errors(tmp_path):
    assert set(CLIP_CONFIGS) >= {"ViT-L-14-336", "ViT-L-14", "ViT-B-16"}
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-X'"):
        build_clip_visual("ViT-X")
    with pytest.raises(ValueError, match="loads a local Hugging Face checkpoint directory"):
        build_clip_visual(write_tiny_clip_config(tmp_path), pretrained=tmp_path / "ViT-L-14-336px.pt")
    with pytest.raises(ValueError, match="backend must be one of"):
        build_clip_visual("ViT-B-16", backend="jax")
    open_clip_style = tmp_path / "oc.json"
    open_clip_style.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"layers": 2}}))
    with pytest.raises(ValueError, match="got an open_clip config"):
        build_clip_visual(open_clip_style)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"lacks \['num_hidden_layers'"):
        build_clip_visual(partial)


@pytest.mark.parametrize("kind", ["vision_tower", "full_clip_model"])
def test_load_hugging_face_checkpoints(tmp_path, kind):
    """A CLIP vision checkpoint, and a whole CLIP model (text + vision, the format of openai/clip-vit-large-patch14-336
    that LLaVA uses), saved with save_pretrained: the encoder's embedding equals transformers' own image features and
    its levels equal the model's hidden states."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    vision = CLIPVisionConfig(**TINY_CLIP)
    if kind == "vision_tower":
        source = CLIPVisionModelWithProjection(vision).eval()
    else:
        text = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "max_position_embeddings": 8}  # fmt: skip
        source = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16)).eval()
    source.save_pretrained(tmp_path / kind)
    encoder = CLIPImageEncoder(pretrained=tmp_path / kind, feature_layers=[0, 2])
    x = torch.randn(2, 3, 32, 32)
    features = encoder(x)
    with torch.no_grad():
        if kind == "vision_tower":
            out = source(pixel_values=x, output_hidden_states=True)
            expected, hidden = out.image_embeds, out.hidden_states
        else:
            expected = source.get_image_features(pixel_values=x)
            expected = getattr(expected, "pooler_output", expected)  # newer transformers return an output object
            hidden = source.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(features.global_embedding, expected, rtol=0, atol=0)
    for level, block in zip(features.levels, (0, 2)):
        torch.testing.assert_close(level, hidden[block + 1][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot be loaded"):
        CLIPImageEncoder(pretrained=broken)


def test_open_clip_backend_matches_the_transformers_tower(tmp_path):
    """Where open_clip imports (it needs a torchvision that matches torch), its tower and transformers' give the same
    features for the same weights; here open_clip is not importable next to the CPU-only torch, so this is skipped."""
    open_clip = _try_import_open_clip()
    if open_clip is None:
        pytest.skip("open_clip is not importable here (its torchvision needs a matching CUDA torch)")
    oc_config = tmp_path / "tiny-oc.json"
    oc_config.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32,
                                                                      "patch_size": 8, "head_width": 16}}))  # fmt: skip
    reference = build_clip_visual(oc_config, backend="open_clip", force_quick_gelu=True).eval()
    assert reference.backend == "open_clip" and reference.grid_size == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    embedding, levels = reference(x, [0, 2])
    assert embedding.shape == (2, 16) and [tuple(f.shape) for f in levels] == [(2, 32, 4, 4)] * 2


def test_sequence_encoder_masks_and_gradients():
    torch.manual_seed(0)
    encoder = SequenceEncoder({"audio": 5, "vision": 20}, out_dim=12, d_model=16, num_layers=3, num_heads=4).eval()
    assert len(encoder.encoders["audio"].layers) == 3
    audio, vision = torch.randn(2, 6, 5), torch.randn(2, 9, 20)
    masks = {
        "audio": torch.tensor([[1] * 4 + [0] * 2, [1] * 6]).bool(),
        "vision": torch.tensor([[1] * 9, [1] * 3 + [0] * 6]).bool(),
    }
    out = encoder({"audio": audio, "vision": vision}, masks)
    assert out.shape == (2, 12)
    # padded frames do not matter
    noisy = {"audio": audio.clone(), "vision": vision.clone()}
    noisy["audio"][0, 4:] = 100.0
    noisy["vision"][1, 3:] = -50.0
    torch.testing.assert_close(encoder(noisy, masks), out, atol=1e-5, rtol=1e-5)
    # a sample alone equals it in the batch
    alone = encoder({"audio": audio[:1, :4], "vision": vision[:1]}, None)
    torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-5)
    # an empty modality gives finite output; gradients reach every parameter
    masks["audio"][1] = False
    encoder.train()
    encoder({"audio": audio, "vision": vision}, masks).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"features\['audio'\] must be \(B, T, 5\)"):
        encoder({"audio": torch.randn(2, 6, 4), "vision": vision})
    with pytest.raises(ValueError, match="missing \\['vision'\\]"):
        encoder({"audio": audio})


def test_patch_tokens_are_clips_last_hidden_state_without_the_class_token(tmp_path):
    encoder = CLIPImageEncoder(write_tiny_clip_config(tmp_path))  # default feature layers end at the last block
    images = torch.randn(2, 3, 32, 32)
    patches = encoder(images).patches
    with torch.no_grad():
        direct = encoder.visual.tower(pixel_values=images).last_hidden_state
    assert patches.shape == (2, 16, TINY_CLIP["hidden_size"])  # 4 x 4 patches of 8 pixels, row-major
    torch.testing.assert_close(patches, direct[:, 1:])
