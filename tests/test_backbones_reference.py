"""Our ViTs against an independent implementation (timm's DINOv2 / DINO ViTs, random weights shared
through the state dict): same block outputs at the native grid, so the module tree is not only
named like the official one but computes the same function."""
import pytest
import torch

from fdsbench.blocks.backbones import build_backbone

timm = pytest.importorskip("timm")


def _timm_blocks(model, x, indices, norm):
    return model.forward_intermediates(x, indices=list(indices), norm=norm, output_fmt="NCHW",
                                       intermediates_only=True, stop_early=True)


@pytest.mark.parametrize("ours,theirs,size,kw", [
    ("dinov2_vits14", "vit_small_patch14_dinov2", 518, {"img_size": 518}),
    ("dino_vits8", "vit_small_patch8_224.dino", 224, {}),
])
def test_block_outputs_match_timm(ours, theirs, size, kw):
    bb = build_backbone(ours, weights="random", seed=0)
    ref = timm.create_model(theirs, pretrained=False, num_classes=0, **kw).eval()
    sd = {k: v for k, v in bb.state_dict().items() if k != "mask_token"}  # timm has no mask token
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _timm_blocks(ref, x, (2, 5), norm=False)
        want_norm = _timm_blocks(ref, x, (5,), norm=True)
    got = bb.forward_features(x, layers=(2, 5))
    got_norm = bb.forward_features(x, layers=(5,), norm=True)
    for g, w in zip(got + got_norm, want + want_norm):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4), (g - w).abs().max()
