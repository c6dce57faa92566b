import torch

from vgstudy.models import GroundingHead, describe


def _head(**kw):
    torch.manual_seed(0)
    return GroundingHead(num_tokens=12, dim=32, depth=2, heads=4, ffn_dim=64, dropout=0.0, **kw)


def test_shapes_range_and_reg_feature():
    head = _head()
    boxes, reg = head(torch.randn(3, 12, 32))
    assert boxes.shape == (3, 4) and reg.shape == (3, 32)
    assert (boxes > 0).all() and (boxes < 1).all()


def test_parameter_count_matches_the_transvg_fusion_formula():
    d, f, n, depth = 256, 2048, 20 + 400, 6
    head = GroundingHead(num_tokens=n, dim=d, depth=depth, ffn_dim=f)
    attn = 4 * d * d + 4 * d
    ffn = d * f + f + f * d + d
    layer = attn + ffn + 2 * 2 * d
    mlp = 2 * (d * d + d) + d * 4 + 4
    expected = depth * layer + mlp + d + (n + 1) * d
    assert describe(head)["total"] == expected


def test_padding_is_masked():
    head = _head().eval()
    tokens = torch.randn(1, 12, 32)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 8:] = True
    changed = tokens.clone()
    changed[0, 8:] = torch.randn(4, 32) * 10
    a, _ = head(tokens, mask)
    b, _ = head(changed, mask)
    assert torch.allclose(a, b, atol=1e-6)
    c, _ = head(changed)  # without the mask, the padding tokens do matter
    assert not torch.allclose(a, c, atol=1e-4)


def test_samples_of_a_batch_are_independent_and_gradients_reach_every_parameter():
    head = _head(normalize_before=True).eval()
    tokens = torch.randn(2, 12, 32)
    alone, _ = head(tokens[:1])
    together, _ = head(tokens)
    assert torch.allclose(alone, together[:1], atol=1e-6)
    head.train()
    boxes, _ = head(tokens)
    boxes.sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_wrong_token_count_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="built for 12 tokens, got 5"):
        _head()(torch.randn(1, 5, 32))


def test_encode_gives_every_token_and_a_float_mask_is_added_not_masked():
    head = _head().eval()
    tokens = torch.randn(2, 12, 32)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[:, 8:] = True
    out = head.encode(tokens, padding)
    assert out.shape == (2, 13, 32)
    boxes, reg = head(tokens, padding)
    assert torch.allclose(reg, out[:, 0]) and torch.allclose(boxes, head.box_mlp(out[:, 0]).sigmoid())
    changed = tokens.clone()
    changed[:, 8:] += 5.0  # only padded tokens change
    # A float mask is a bias on the logits: padded tokens still take part; an all-zero one is no mask at all.
    assert not torch.allclose(head.encode(tokens, padding.float())[:, 0], head.encode(changed, padding.float())[:, 0])
    assert torch.allclose(head.encode(tokens, torch.zeros(2, 12)), head.encode(tokens), atol=1e-6)
