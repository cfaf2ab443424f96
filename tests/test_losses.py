"""Mixed normal Dice loss (SOFS Eq. 6), plain Dice and CE (fdsbench.blocks.losses)."""
import pytest
import torch

from fdsbench.blocks.losses import binary_cross_entropy, dice_ce_loss, dice_loss, mixed_normal_dice_loss


def test_mndl_equals_dice_on_defect_targets():
    torch.manual_seed(0)
    x = torch.rand(3, 8, 8)
    y = torch.zeros(3, 8, 8)
    y[0, 2:4, 2:4] = 1
    y[1, 0, 0] = 1
    y[2] = 1
    for eta in (1.0, 1e4, 1e5):
        assert torch.allclose(mixed_normal_dice_loss(x, y, eta=eta, reduction="none"), dice_loss(x, y, reduction="none"))
    inter, sx, sy = (x[0] * y[0]).sum(), x[0].sum(), y[0].sum()
    assert mixed_normal_dice_loss(x[:1], y[:1]).item() == pytest.approx(1 - (2 * inter + 1e-5) / (sx + sy + 1e-5))


@pytest.mark.parametrize("eta", [1.0, 1e4, 1e5])
def test_mndl_on_normal_targets(eta):
    x = torch.full((2, 8, 8), 0.01)
    x[1, 3, 3] = 0.9
    y = torch.zeros(2, 8, 8)
    per = mixed_normal_dice_loss(x, y, eta=eta, reduction="none")
    expect = 1 - 1 / (eta * x.sum((1, 2)) + 1)
    assert torch.allclose(per, expect)
    assert mixed_normal_dice_loss(x, y, eta=eta, beta=0.5, reduction="none").allclose(0.5 * expect)
    # a silent prediction costs nothing on a normal sample
    assert mixed_normal_dice_loss(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), eta=eta).item() == 0.0


def test_mixed_batch_averages_both_terms():
    x = torch.rand(2, 4, 4)
    y = torch.zeros(2, 4, 4)
    y[0, 1, 1] = 1
    both = mixed_normal_dice_loss(x, y, eta=10.0)
    a = dice_loss(x[:1], y[:1])
    b = 1 - 1 / (10.0 * x[1].sum() + 1)
    assert both.item() == pytest.approx(((a + b) / 2).item(), rel=1e-6)


@pytest.mark.parametrize("eta", [1.0, 1e4, 1e5])
def test_normal_sample_gradient_exceeds_defect_gradient_at_start_of_training(eta):
    """Paper §3.2.5: early on the model outputs ~0 everywhere; once it predicts a false positive on
    a normal sample, the normal term's gradient is larger than a defect sample's."""
    z0 = torch.full((1, 16, 16), -12.0)  # sigmoid ~ 6e-6: "almost outputs 0 for all inputs"
    z0[0, 8, 8] = -2.0  # one (weak) false-positive pixel
    y_normal = torch.zeros(1, 16, 16)
    y_defect = torch.zeros(1, 16, 16)
    y_defect[0, 2:5, 2:5] = 1  # a small defect elsewhere
    grads = {}
    for name, y in (("normal", y_normal), ("defect", y_defect)):
        z = z0.clone().requires_grad_(True)
        mixed_normal_dice_loss(torch.sigmoid(z), y, eta=eta).backward()
        grads[name] = z.grad
    assert grads["normal"][0, 8, 8] > 0  # pushes the false positive down
    assert grads["normal"][0, 8, 8].abs() > grads["defect"][0, 8, 8].abs()
    assert grads["normal"].norm() > grads["defect"].norm()


def test_ce_and_total():
    x = torch.tensor([[0.9, 0.1]])
    y = torch.tensor([[1.0, 0.0]])
    ce = binary_cross_entropy(x, y)
    assert ce.item() == pytest.approx(-torch.log(torch.tensor(0.9 + 1e-6)).item(), rel=1e-5)
    tot = dice_ce_loss(x, y, eta=1.0)
    assert tot.item() == pytest.approx(mixed_normal_dice_loss(x, y, eta=1.0).item() + 0.01 * ce.item(), rel=1e-6)
    assert dice_ce_loss(x, y, mixed=False).item() == pytest.approx(dice_loss(x, y).item() + 0.01 * ce.item(), rel=1e-6)
