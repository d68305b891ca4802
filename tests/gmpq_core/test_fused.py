import pytest
import torch

from gmpq_core.fused import act_mixture, act_mixture_reference


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (1, 8), (4,)])
def test_fused_act_mixture_matches_reference_values_and_gradients(signed, bits):
    gen = torch.Generator().manual_seed(len(bits) + signed)
    x0 = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 3
    logits = torch.randn(len(bits), generator=gen, dtype=torch.float64)
    clips0 = torch.rand(len(bits), generator=gen, dtype=torch.float64) * 3 + 0.5
    g = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    results = []
    for fn in (act_mixture_reference, act_mixture):
        x = x0.clone().requires_grad_()
        lg = logits.clone().requires_grad_()
        clips = clips0.clone().requires_grad_()
        out = fn(x, torch.softmax(lg, 0), clips, bits, signed)
        (out * g).sum().backward()
        results.append((out.detach(), x.grad, lg.grad, clips.grad))
    for ref, fused in zip(*results):
        assert torch.allclose(ref, fused, atol=1e-9), (ref, fused)
