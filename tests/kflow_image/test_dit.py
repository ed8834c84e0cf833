"""DiT backbone: shapes, adaLN-Zero initialisation, classifier-free guidance."""
from __future__ import annotations

import pytest
import torch

from kflow_image.dit import DiT, build_dit, k_embedding, sincos_pos_embed_2d


def _tiny(**kw) -> DiT:
    args = dict(in_channels=3, input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return DiT(**args)


def _perturb(model: DiT) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("size,patch,channels", [(8, 1, 32), (8, 2, 4), (32, 4, 1), ((8, 16), 2, 3)])
def test_output_shape(size, patch, channels):
    model = _tiny(in_channels=channels, input_size=size, patch_size=patch)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, channels, h, w)
    out = model(x, torch.rand(3), torch.tensor([0, 1, 5]))
    assert out.shape == x.shape


def test_adaln_zero_init_output_is_exactly_zero_and_blocks_are_identity():
    model = _tiny()
    x = torch.randn(4, 3, 8, 8)
    k = torch.rand(4)
    y = torch.tensor([0, 1, 2, 5])
    out = model(x, k, y)
    assert torch.equal(out, torch.zeros_like(out))
    tok = torch.randn(4, model.grid[0] * model.grid[1], 32)
    c = model.condition(k, y, 4)
    for blk in model.blocks:
        assert torch.equal(blk(tok, c), tok)


def test_output_depends_on_k_and_label_after_training_starts():
    model = _tiny()
    _perturb(model)
    x = torch.randn(2, 3, 8, 8)
    a = model(x, torch.tensor([0.1, 0.1]), torch.tensor([0, 0]))
    b = model(x, torch.tensor([0.9, 0.9]), torch.tensor([0, 0]))
    c = model(x, torch.tensor([0.1, 0.1]), torch.tensor([1, 1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_forward_with_cfg_scale_one_equals_conditional_and_scale_zero_unconditional():
    model = _tiny().double()
    _perturb(model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    k = torch.rand(3, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    cond = model(x, k, y)
    uncond = model(x, k, None)
    assert torch.equal(model.forward_with_cfg(x, k, y, 1.0), cond)
    # the doubled-batch path (scale != 1) reproduces both branches
    s = 2.5
    torch.testing.assert_close(model.forward_with_cfg(x, k, y, s), uncond + s * (cond - uncond),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.forward_with_cfg(x, k, y, 0.0), uncond, rtol=1e-10, atol=1e-10)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        _tiny(input_size=9)
    model = _tiny()
    with pytest.raises(ValueError, match="labels"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([7]))
    with pytest.raises(ValueError, match="spatial size"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]))


def test_presets_and_embeddings():
    model = build_dit("tiny", in_channels=32, input_size=8, patch_size=1, num_classes=10)
    assert model.config.hidden_size == 128 and len(model.blocks) == 4
    with pytest.raises(ValueError, match="preset"):
        build_dit("huge")
    pe = sincos_pos_embed_2d(16, 4, 4)
    assert pe.shape == (16, 16) and len({tuple(r) for r in pe.round(8)}) == 16
    e = k_embedding(torch.tensor([0.0, 0.5, 1.0]), 64)
    assert e.shape == (3, 64) and not torch.allclose(e[0], e[2])
