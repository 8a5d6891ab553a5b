"""Encoders and projection heads."""
import pytest
import torch
from torch import nn

from simclr_ext.recipe.models import ProjectionHead, SimCLRModel, SmallCNN, build_model, resnet_encoder


@pytest.mark.parametrize("size", [8, 16, 28])
def test_small_cnn_shapes(size):
    net = SmallCNN(in_channels=1, width=8)
    assert net(torch.randn(3, 1, size, size)).shape == (3, 128)  # 32 channels on a 2x2 grid
    assert net.feature_dim == 128
    assert SmallCNN(1, 8, convs_per_stage=2, pool=1)(torch.randn(2, 1, size, size)).shape == (2, 32)


def test_small_cnn_final_relu_switch():
    torch.manual_seed(0)
    with_relu = SmallCNN(1, 4, pool=1)
    torch.manual_seed(0)
    without = SmallCNN(1, 4, pool=1, final_relu=False)
    assert with_relu.state_dict().keys() == without.state_dict().keys()  # same parameters, one ReLU less
    assert isinstance(with_relu.features[-1], nn.ReLU) and isinstance(without.features[-1], nn.BatchNorm2d)
    x = torch.randn(16, 1, 16, 16)
    h, g = with_relu.train()(x), without.train()(x)
    assert (h >= 0).all() and (g < 0).any()  # pooled BN outputs are centred, not clipped at 0
    # training-mode BN: the pooled features average to ~0 over the batch per channel
    assert g.mean(0).abs().max() < 1e-4
    m = build_model("small_cnn", 1, 4, pool=1, final_relu=False, proj_dim=8)
    assert isinstance(m.encoder.features[-1], nn.BatchNorm2d)


def test_resnet18_cifar_stem():
    net = resnet_encoder("resnet18", in_channels=3, cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_resnet_imagenet_stem_and_widths():
    net = resnet_encoder("resnet18", cifar_stem=False)
    assert net.conv1.kernel_size == (7, 7) and not isinstance(net.maxpool, nn.Identity)
    assert resnet_encoder("resnet34").feature_dim == 512
    assert resnet_encoder("resnet50").feature_dim == 2048


def test_random_init_differs_by_seed():
    torch.manual_seed(0)
    a = resnet_encoder("resnet18").conv1.weight.clone()
    torch.manual_seed(1)
    b = resnet_encoder("resnet18").conv1.weight
    assert not torch.equal(a, b)


@pytest.mark.parametrize("head,linears,bns", [("simclr", 2, 1), ("simclrv2", 3, 2)])
def test_projection_heads(head, linears, bns):
    model = build_model("small_cnn", 1, width=4, head=head, proj_dim=24)
    mods = list(model.head.modules())
    assert sum(isinstance(m, nn.Linear) for m in mods) == linears
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mods) == bns
    h, z = model(torch.randn(5, 1, 16, 16))
    assert h.shape == (5, 64) and z.shape == (5, 24)
    z.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_simclr_model_returns_encoder_output():
    model = SimCLRModel(SmallCNN(1, 4), ProjectionHead(64, 8, 4))
    model.eval()
    x = torch.randn(2, 1, 16, 16)
    h, z = model(x)
    torch.testing.assert_close(h, model.encoder(x))
    torch.testing.assert_close(z, model.head(h))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg11")
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("small_cnn", 1, head="byol")
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(8, num_layers=4)
    with pytest.raises(ValueError, match="width"):
        SmallCNN(1, 0)
