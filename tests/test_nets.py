import pytest
import torch

from specdiff_train.nets import MLPDenoiser, UNet


def test_mlp_shapes_and_features_from_the_same_pass():
    net = MLPDenoiser(dim=3, hidden=32, depth=2)
    x, t = torch.randn(5, 3), torch.randint(0, 1000, (5,))
    out, features = net(x, t, return_features=True)
    assert out.shape == (5, 3) and features.shape == (5, net.feature_dim) and net.sample_shape == (3,)
    torch.testing.assert_close(out, net(x, t))


@pytest.mark.parametrize("channels,size,mults", [(1, 8, (1, 2)), (3, 16, (1, 2, 2))])
def test_unet_shapes_and_features(channels, size, mults):
    net = UNet(in_channels=channels, image_size=size, base_channels=16, channel_mults=mults, num_res_blocks=1,
               attention_levels=(1,), num_heads=2)
    x, t = torch.randn(2, channels, size, size), torch.randint(0, 1000, (2,))
    out, features = net(x, t, return_features=True)
    assert out.shape == x.shape and features.shape == (2, 16, size, size)
    assert net.sample_shape == (channels, size, size) and net.feature_dim == 16
    torch.testing.assert_close(out, net(x, t))


def test_unet_refuses_an_image_size_it_cannot_halve():
    with pytest.raises(ValueError, match="image_size=10.*channel_mults.*resize"):
        UNet(image_size=10, channel_mults=(1, 2, 2))


def test_unet_group_norm_fits_channel_counts_that_are_not_powers_of_two():
    net = UNet(base_channels=24, channel_mults=(1, 3), num_res_blocks=1, num_heads=3)  # 24 and 72 channels
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 and m.num_groups >= 8 for m in norms)
    assert net(torch.randn(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 1, 8, 8)


def test_output_conv_starts_at_zero():
    net = UNet(base_channels=16, num_res_blocks=1)
    assert net(torch.randn(2, 1, 8, 8), torch.tensor([3, 500])).abs().max() == 0


def test_digits_unet_is_about_a_million_parameters():
    net = UNet(base_channels=32)
    assert 0.8e6 < sum(p.numel() for p in net.parameters()) < 1.3e6


def test_unet_moves_between_devices_and_dtypes():
    net = UNet(base_channels=16, num_res_blocks=1).to(torch.float64)  # nn.Module._apply must not be shadowed
    assert next(net.parameters()).dtype == torch.float64
