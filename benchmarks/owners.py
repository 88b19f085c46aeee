"""Owner architectures of the kind users hand over, with zero-argument factories.

They are *not* the builder's small architectures (`fingerprints.models.ARCHITECTURES`): they
carry BatchNorm, as most trained classifiers do, and serve the owner-forms regression world
(`benchmarks/owner_forms.py`) and its tests, where an owner is handed over as TorchScript
(traced or scripted), as a `.pt2` program, or as `package.module:factory` plus weights.
"""

from __future__ import annotations

from torch import nn


def vgg_bn(in_channels: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> nn.Sequential:
    """A VGG-like plain CNN with BatchNorm: three blocks of two 3x3 convolutions, max-pooled."""
    layers: list[nn.Module] = []
    cin = in_channels
    for ch in widths:
        layers += [nn.Conv2d(cin, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
                   nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
        cin = ch
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def cifar_vgg_bn() -> nn.Sequential:
    """The CIFAR-10 owner of the regression world (289 k parameters)."""
    return vgg_bn(3, 10)


def cifar_vgg_bn_small() -> nn.Sequential:
    """A narrower model of the same family: the world's other-architecture independent model."""
    return vgg_bn(3, 10, (16, 32, 64))


def fmnist_cnn_bn() -> nn.Sequential:
    """A small BatchNorm CNN for 28x28 grey images (Fashion-MNIST)."""
    return vgg_bn(1, 10, (8, 16, 32))


def fmnist_cnn_plain() -> nn.Sequential:
    """The same without BatchNorm: the form the builder handled before."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )
