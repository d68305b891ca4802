"""Seeded generators and the all-close check shared by the fused-mixture tests (test_fused.py,
test_fused_conv.py; same folder, pytest puts it on sys.path)."""
import torch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_all_close(ref, got, atol):
    for r, f in zip(ref, got):
        assert r.dtype == f.dtype and r.shape == f.shape
        assert torch.allclose(r, f, atol=atol, rtol=0), (r - f).abs().max()
