"""Baseline models for volume classification."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CNN3D"]


class CNN3D(nn.Module):
    """The classic tutorial 3D CNN for binary classification of volumes, fixed.

    Four blocks of ``Conv3d(k=3, padding=1) -> ReLU -> MaxPool3d(2)`` with 32, 64, 128 and
    256 channels, then ``Linear(flat, 512) -> ReLU -> Dropout(0.3) -> Linear(512, 1)``.
    Unlike the tutorial it derives from, :meth:`forward` returns the logits (the tutorial
    forgot the ``return``), and the flattened size is computed from ``input_shape`` rather
    than hard-coded, so any input shape with every side >= 16 works.

    Train with :class:`torch.nn.BCEWithLogitsLoss` on the logits: it equals sigmoid
    followed by binary cross-entropy but is computed with the log-sum-exp trick, so it
    neither overflows nor loses precision for large ``|logit|``. Use
    :meth:`predict_proba` for probabilities.

    Parameters
    ----------
    in_channels
        Channels of the input volume.
    input_shape
        (D, H, W) of the inputs the model will see.
    dropout
        Dropout probability before the last layer.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)

    def __init__(
        self,
        in_channels: int = 1,
        input_shape: Sequence[int] = (64, 64, 64),
        *,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        shape = [int(n) for n in input_shape]
        if len(shape) != 3:
            raise ValueError(f"input_shape must be (D, H, W), got {tuple(input_shape)}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in self.channels:
            layers += [
                nn.Conv3d(previous, width, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(2),
            ]
            previous = width
            shape = [n // 2 for n in shape]  # MaxPool3d(2) floors odd sizes
        if min(shape) < 1:
            raise ValueError(
                f"input_shape {tuple(input_shape)} is too small: every side must be >= 16"
            )
        self.input_shape = tuple(int(n) for n in input_shape)
        self.features = nn.Sequential(*layers)
        flat = previous * shape[0] * shape[1] * shape[2]
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (B, 1) for inputs (B, C, D, H, W)."""
        logits: torch.Tensor = self.head(self.features(x))
        return logits

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Return probabilities ``sigmoid(logits)`` of shape (B, 1)."""
        return torch.sigmoid(self.forward(x))
