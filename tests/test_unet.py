"""The EDM-style UNet: shapes, conditioning, dependence on c_noise, batch independence, configs."""
import math

import pytest
import torch

from edmrt.models import UNET_CONFIGS, EDMUNet, UNetConfig, build_unet
from edmrt.models.unet import count_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(**overrides) -> EDMUNet:
    torch.manual_seed(0)
    return build_unet("tiny", **overrides).eval()


def _c_noise(B, gen):
    """c_noise = ln(sigma) / 4 for sigma log-uniform in [0.002, 80] (EDM's range)."""
    return 0.25 * torch.empty(B).uniform_(math.log(0.002), math.log(80.0), generator=gen)


# Parameter counts stated in UNET_CONFIGS' comments (measured: tiny 11,506; digits 1,828,129; cifar10 54,005,763).
@pytest.mark.parametrize("name, lo, hi", [("tiny", 1e3, 2e4), ("digits", 1e6, 3e6), ("cifar10", 4.5e7, 6e7)])
def test_parameter_counts(name, lo, hi):
    n = count_parameters(build_unet(name))
    assert lo <= n <= hi, f"{name}: {n:,} parameters, expected [{lo:,.0f}, {hi:,.0f}]"


def test_configs():
    assert set(UNET_CONFIGS) >= {"tiny", "digits", "cifar10"}
    d = UNET_CONFIGS["digits"]
    assert d.num_classes == 10 and d.img_channels == 1 and d.img_resolution in (8, 16)
    c = UNET_CONFIGS["cifar10"]
    assert (c.img_channels, c.img_resolution) == (3, 32)
    assert build_unet("tiny").sample_shape == (2, 8, 8)


def test_shapes_and_c_noise_layouts(gen):
    net = _net()
    B = 3
    x = torch.randn(B, 2, 8, 8, generator=gen)
    c = _c_noise(B, gen)
    with torch.no_grad():
        F = net(x, c)
        assert F.shape == x.shape and F.dtype == torch.float32 and torch.isfinite(F).all()
        # (B, 1, 1, 1) as the executors pass it: the same function.
        torch.testing.assert_close(net(x, c.view(B, 1, 1, 1)), F, rtol=0, atol=0)
        # One noise level for the whole batch: a scalar, (1,) and an expanded (B,) agree.
        F1 = net(x, c[:1].expand(B).contiguous())
        torch.testing.assert_close(net(x, c[0]), F1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net(x, c[:1]), F1, rtol=1e-6, atol=1e-6)
        # Resolution-agnostic: 16x16 runs with the 8x8 config.
        assert net(torch.randn(2, 2, 16, 16, generator=gen), c[:2]).shape == (2, 2, 16, 16)


def test_f_depends_on_c_noise(gen):
    net = _net()
    x = torch.randn(2, 2, 8, 8, generator=gen)
    with torch.no_grad():
        F_lo = net(x, torch.full((2,), math.log(0.01) / 4))
        F_hi = net(x, torch.full((2,), math.log(50.0) / 4))
    rel = float((F_lo - F_hi).abs().max() / F_lo.abs().max())
    assert rel > 1e-2, f"F barely depends on c_noise (relative change {rel:.2e})"


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_batch_independence(embedding, gen):
    """Row i of a batch is the net applied to row i alone: nothing mixes samples (GroupNorm is per sample)."""
    net = _net(num_classes=3, embedding=embedding)
    B = 4
    x, c = torch.randn(B, 2, 8, 8, generator=gen), _c_noise(B, gen)
    y = torch.tensor([0, 3, 2, 1])
    with torch.no_grad():
        F = net(x, c, y)
        for i in range(B):
            torch.testing.assert_close(net(x[i:i + 1], c[i:i + 1], y[i:i + 1]), F[i:i + 1], rtol=1e-5, atol=1e-5)


def test_class_conditioning_and_null_label(gen):
    net = _net(num_classes=3)
    x, c = torch.randn(2, 2, 8, 8, generator=gen), _c_noise(2, gen)
    with torch.no_grad():
        F0 = net(x, c, torch.tensor([0, 0]))
        F1 = net(x, c, torch.tensor([1, 1]))
        F_null = net(x, c, torch.tensor([3, 3]))  # label index num_classes = the null label
        assert float((F0 - F1).abs().max()) > 1e-3 * float(F0.abs().max())
        assert float((F0 - F_null).abs().max()) > 1e-3 * float(F0.abs().max())
        # None means the null label.
        torch.testing.assert_close(net(x, c, None), F_null, rtol=0, atol=0)
    assert net.map_label.num_embeddings == 4


def test_bad_inputs_raise(gen):
    net = _net()
    x, c = torch.randn(2, 2, 8, 8, generator=gen), _c_noise(2, gen)
    with pytest.raises(ValueError, match="unconditional"):
        net(x, c, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(2, 3, 8, 8), c)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 2, 7, 7), c)
    with pytest.raises(ValueError, match="c_noise"):
        net(x, torch.zeros(2, 3))
    cond = _net(num_classes=3)
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, c, torch.tensor([0.0, 1.0]))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown UNet config"):
        build_unet("imagenet")
    with pytest.raises(ValueError, match="unknown UNet option"):
        build_unet("tiny", channels=3)
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(img_resolution=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="embedding"):
        UNetConfig(embedding="learned")
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(num_classes=-1)


def test_fp16_inside_matches_fp32(gen):
    """to_fp16: float16 convolutions, float32 GroupNorm/embedding, float32 I/O; close to the float32 net."""
    net = _net(num_classes=3)
    half = build_unet("tiny", num_classes=3)
    half.load_state_dict(net.state_dict())
    half.eval().to_fp16()
    assert half.conv_in.weight.dtype == torch.float16 and half.norm_out.weight.dtype == torch.float32
    x, c, y = torch.randn(3, 2, 8, 8, generator=gen), _c_noise(3, gen), torch.tensor([0, 3, 1])
    with torch.no_grad():
        F, F16 = net(x, c, y), half(x, c, y)
    assert F16.dtype == torch.float32
    err = float((F16 - F).abs().max())
    assert err <= 1e-2 * max(1.0, float(F.abs().max())), err
