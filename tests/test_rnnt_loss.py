"""The vectorised torch RNN-T loss used to train the demo model matches NeMo's own RNNT loss (value and gradients)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch = pytest.importorskip("torch")
pytest.importorskip("nemo.collections.asr")

from nemo.collections.asr.losses.rnnt import RNNTLoss  # noqa: E402

from tools.demo_model.rnnt_loss import rnnt_loss  # noqa: E402


def _inputs(seed, B=3, T=7, U=4, V=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V - 1, (B, U), generator=g)  # blank = V - 1 never a target
    logit_lengths = torch.tensor([T, T - 2, T - 3][:B])
    target_lengths = torch.tensor([U, U - 1, 2][:B])
    return logits, targets, logit_lengths, target_lengths


@pytest.mark.parametrize("loss_name", ["pytorch", "warprnnt_numba"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_nemo(loss_name, seed):
    logits, targets, tl, ul = _inputs(seed)
    V = logits.shape[-1]
    blank = V - 1
    ref_loss = RNNTLoss(num_classes=blank, reduction=None, loss_name=loss_name)

    a = logits.clone().float().requires_grad_(True)
    ours = rnnt_loss(a, targets, tl, ul, blank=blank, reduction="none")
    ours.sum().backward()

    b = logits.clone().float().requires_grad_(True)
    ref = ref_loss(log_probs=torch.log_softmax(b, -1), targets=targets, input_lengths=tl, target_lengths=ul)
    ref.sum().backward()

    assert torch.allclose(ours, ref.to(ours.dtype), atol=1e-4, rtol=1e-4), (ours, ref)
    assert torch.allclose(a.grad, b.grad, atol=1e-4), (a.grad - b.grad).abs().max()


def test_reductions_and_zero_length_targets():
    logits, targets, tl, _ = _inputs(3)
    ul = torch.tensor([0, 1, 2])
    # NeMo's reference loss wants the lattice exactly max(target_lengths) + 1 wide
    targets, logits = targets[:, :2], logits[:, :, :3]
    V = logits.shape[-1]
    per = rnnt_loss(logits, targets, tl, ul, blank=V - 1)
    ref = RNNTLoss(num_classes=V - 1, reduction=None, loss_name="pytorch")(
        log_probs=torch.log_softmax(logits.float(), -1), targets=targets, input_lengths=tl, target_lengths=ul)
    assert torch.allclose(per, ref.to(per.dtype), atol=1e-4)
    assert torch.allclose(rnnt_loss(logits, targets, tl, ul, blank=V - 1, reduction="sum"), per.sum())
    assert torch.allclose(rnnt_loss(logits, targets, tl, ul, blank=V - 1, reduction="mean_volume"),
                          per.sum() / ul.sum())
