"""A dataset's per-channel mean and standard deviation, and the check that a network fits its data.

``python -m robustattr.data.stats --config configs/my_run.yaml [--num_samples 5000]`` prints the statistics of the
training split of the config's dataset (plain images, no augmentation) and the YAML lines for the net's ``mean``
and ``std``. Any ``--data...`` override of train.py works here too (``--data.init_args.root /datasets/x``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from robustattr.errors import ConfigError
from robustattr.models.layers import Normalize

STATS_COMMAND = "python -m robustattr.data.stats --config <your config>"


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over all pixels of (N, C, H, W) images."""
    per_channel = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return per_channel.mean(dim=1).tolist(), per_channel.std(dim=1).tolist()


def _first(model: nn.Module, kind: type[nn.Module]) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


def check_net_fits_data(net: nn.Module, images: torch.Tensor) -> list[str]:
    """Errors (raised) and warnings (returned) about ``net`` on ``images``, a sample of its data.

    - the data's channel count must be what the first convolution takes;
    - the input normalisation must have one value per channel, or a single value only for data whose channels are
      copies of each other (grayscale in RGB): one value for colour images is another dataset's statistics;
    - normalisation statistics far from the data's are reported (they may be right: fine-tuning keeps the
      statistics the weights were trained with)."""
    channels = images.shape[1]
    conv = _first(net, nn.Conv2d)
    if conv is not None and conv.in_channels != channels:
        flag = "model.net.init_args.in_channels" if "in_channels" in _init_parameters(net) else "the net's input layer"
        raise ConfigError(
            f"the data has {channels} channel(s) but the network's first convolution takes {conv.in_channels}: set "
            f"{flag}: {channels} (or the data's channels, e.g. data.init_args.channels)"
        )
    norm = _first(net, Normalize)
    if norm is None:
        return []
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    if len(mean) not in (1, channels):
        raise ConfigError(
            f"the net normalises {len(mean)} channels but the data has {channels}: set model.net.init_args.mean and std"
        )
    data_mean, data_std = channel_stats(images)
    copies = channels == 1 or bool((images == images[:, :1]).all())
    if len(mean) == 1 and not copies:
        raise ConfigError(
            f"the net normalises all {channels} channels with one mean and std ({mean[0]:.3g}, {std[0]:.3g}: "
            f"statistics of single-channel data) but the data's channels differ: set model.net.init_args.mean and std "
            "to the "
            f"data's per-channel values (about {[round(m, 3) for m in data_mean]} and "
            f"{[round(s, 3) for s in data_std]} on a sample; `{STATS_COMMAND}` measures them)"
        )
    warnings = []
    for c in range(channels):
        m, s = mean[c if len(mean) > 1 else 0], std[c if len(std) > 1 else 0]
        if abs(m - data_mean[c]) > 0.15 or not 2 / 3 < s / max(data_std[c], 1e-6) < 3 / 2:
            warnings.append(
                f"the net normalises with mean {mean} and std {std}, but a sample of the data has mean "
                f"{[round(v, 3) for v in data_mean]} and std {[round(v, 3) for v in data_std]} (right when fine-tuning "
                f"weights trained with the former; otherwise set the net's mean and std: `{STATS_COMMAND}`)"
            )
            break
    return warnings


def _init_parameters(net: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(type(net).__init__).parameters)


def main(args: list[str] | None = None) -> dict[str, Any]:
    from robustattr.cli import RobustCLI

    argv = list(sys.argv[1:] if args is None else args)
    samples = 5000
    if "--num_samples" in argv:
        i = argv.index("--num_samples")
        samples = int(argv[i + 1])
        del argv[i : i + 2]
    cli = RobustCLI(args=[*argv, "--trainer.logger", "false", "--trainer.callbacks", "[]"])
    images = cli.datamodule.sample_images(samples, split="train")
    mean, std = channel_stats(images)
    print(f"{len(images)} training images, {images.shape[1]} channel(s), {images.shape[2]}x{images.shape[3]}")
    print("model:\n  net:\n    init_args:")
    print(f"      mean: [{', '.join(f'{v:.4f}' for v in mean)}]")
    print(f"      std: [{', '.join(f'{v:.4f}' for v in std)}]")
    return {"mean": mean, "std": std, "samples": len(images)}


if __name__ == "__main__":  # pragma: no cover
    main()
