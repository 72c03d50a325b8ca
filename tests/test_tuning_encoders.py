"""CLIP image encoder (built-in open_clip-compatible tower; open_clip itself where it imports) and the sequence
encoder."""

from __future__ import annotations

import json

import pytest
import torch
from tuning_fixtures import TINY_CLIP, one_thread, write_tiny_clip_config

from mit.clip import CLIP_CONFIGS, CLIPVisionTower, build_clip_visual, default_feature_layers, register_clip_config
from mit.encoders import CLIPImageEncoder, SequenceEncoder

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_vit_l_14_336_shapes_on_meta():
    with torch.device("meta"):
        tower = CLIPVisionTower(CLIP_CONFIGS["ViT-L-14-336"])
        out = tower.forward_intermediates(torch.empty(1, 3, 336, 336), indices=[7, 15, 23])
    assert tower.grid_size == (24, 24) and tower.width == 1024
    assert out["image_features"].shape == (1, 768)
    assert [tuple(f.shape) for f in out["image_intermediates"]] == [(1, 1024, 24, 24)] * 3
    assert default_feature_layers(24) == [7, 15, 23]
    assert sum(p.numel() for p in tower.parameters()) == 304_293_888  # open_clip's ViT-L-14-336 visual


def test_clip_image_encoder_tiny_config(tmp_path):
    path = write_tiny_clip_config(tmp_path)
    encoder = CLIPImageEncoder(path, backend="native")
    assert (encoder.embed_dim, encoder.width, encoder.image_size, encoder.grid_size) == (16, 32, 32, (4, 4))
    assert encoder.feature_layers == [0, 1, 2]
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.visual.training  # frozen: stays in eval mode
    features = encoder(torch.randn(2, 3, 32, 32))
    assert features.global_embedding.shape == (2, 16)
    assert [tuple(f.shape) for f in features.levels] == [(2, 32, 4, 4)] * 3
    assert not features.global_embedding.requires_grad
    with pytest.raises(ValueError, match=r"feature_layers must be non-empty and in \[0, 3\)"):
        CLIPImageEncoder(path, feature_layers=[5], backend="native")


def test_register_config_and_errors(tmp_path):
    register_clip_config("tiny-test-clip", TINY_CLIP)
    assert CLIPImageEncoder("tiny-test-clip", backend="native").embed_dim == 16
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-X'"):
        build_clip_visual("ViT-X")
    with pytest.raises(ValueError, match="is not a local file"):
        build_clip_visual(write_tiny_clip_config(tmp_path), pretrained="openai", backend="native")
    with pytest.raises(ValueError, match="backend must be"):
        build_clip_visual("ViT-B-16", backend="jax")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"layers": 2}}))
    with pytest.raises(ValueError, match=r"vision_cfg lacks \['image_size', 'patch_size', 'width'\]"):
        build_clip_visual(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", ["open_clip_state_dict", "safetensors", "openai_torchscript"])
def test_load_checkpoints(tmp_path, kind):
    path = write_tiny_clip_config(tmp_path)
    torch.manual_seed(1)
    source = CLIPVisionTower(TINY_CLIP, quick_gelu=True).eval()
    state = {"visual." + k: v for k, v in source.state_dict().items()}
    state["logit_scale"] = torch.tensor(1.0)  # a full CLIP checkpoint also holds the text tower
    if kind == "open_clip_state_dict":
        weights = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, weights)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        weights = tmp_path / "open_clip_model.safetensors"
        save_file(state, str(weights))
    else:  # OpenAI's release format: a TorchScript archive whose state_dict has the same key names

        class Full(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.visual = source

            def forward(self, x):
                return self.visual(x)

        weights = tmp_path / "ViT-tiny.pt"
        torch.jit.save(torch.jit.trace(Full(), torch.randn(1, 3, 32, 32), check_trace=False), str(weights))
    encoder = CLIPImageEncoder(path, pretrained=weights, backend="native", force_quick_gelu=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(x).global_embedding, source(x))


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = write_tiny_clip_config(tmp_path)
    other = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], width=64))
    weights = tmp_path / "w.bin"
    torch.save({"visual." + k: v for k, v in CLIPVisionTower(other).state_dict().items()}, weights)
    with pytest.raises(ValueError, match=r"w.bin: .* has shape"):
        CLIPImageEncoder(path, pretrained=weights, backend="native")


def test_native_tower_matches_open_clip(tmp_path):
    """Where open_clip imports (it needs a torchvision that matches torch), the built-in tower equals it exactly."""
    from mit.clip import _try_import_open_clip

    if _try_import_open_clip() is None:
        pytest.skip("open_clip is not importable here")
    path = write_tiny_clip_config(tmp_path)
    for quick in (False, True):
        reference, used = build_clip_visual(path, backend="open_clip", force_quick_gelu=quick)
        assert used == "open_clip"
        weights = tmp_path / "oc.bin"
        torch.save({"visual." + k: v for k, v in reference.state_dict().items()}, weights)
        native, _ = build_clip_visual(path, pretrained=weights, backend="native", force_quick_gelu=quick)
        x = torch.randn(2, 3, 32, 32)
        a = reference.eval().forward_intermediates(x, indices=[0, 2], output_fmt="NCHW")
        b = native.eval().forward_intermediates(x, indices=[0, 2], output_fmt="NCHW")
        torch.testing.assert_close(a["image_features"], b["image_features"], rtol=0, atol=0)
        for p, q in zip(a["image_intermediates"], b["image_intermediates"]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


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
