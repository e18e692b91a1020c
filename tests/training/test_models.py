from __future__ import annotations

import pytest
import torch

from voxlake.training import CNN3D


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 32, 24)])
def test_forward_returns_logits_for_any_input_shape(shape: tuple[int, int, int]) -> None:
    model = CNN3D(1, shape)
    logits = model(torch.randn(3, 1, *shape))
    assert logits.shape == (3, 1)
    probabilities = model.eval().predict_proba(torch.randn(2, 1, *shape))
    assert probabilities.shape == (2, 1)
    assert bool(((probabilities > 0) & (probabilities < 1)).all())


def test_too_small_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        CNN3D(1, (8, 16, 16))


def test_a_few_steps_reduce_the_loss_on_a_separable_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16, 16)
    y = torch.tensor([0.0, 1.0] * 4)
    x[y == 1, :, 4:12, 4:12, 4:12] += 3.0
    model = CNN3D(1, (16, 16, 16), dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(8):
        loss = criterion(model(x).squeeze(1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
