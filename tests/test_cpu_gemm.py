"""training/cpu_gemm.py: oneDNN linears against aten's, the token padding, and how the engine is chosen."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import training.flops
from training.kernels import cpu_gemm
from training.kernels.cpu_gemm import pad_tokens, use_onednn_linears

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch has no oneDNN linear")


@pytest.mark.parametrize("rows", [0, 1, 31, 32, 33, 70])
def test_pad_tokens_appends_zero_rows_up_to_the_bucket(rows):
    t = torch.randn(rows, 5)
    assert pad_tokens(t, onednn=False) is t
    padded = pad_tokens(t, onednn=True)
    assert padded.shape == (-(-rows // cpu_gemm.TOKEN_BUCKET) * cpu_gemm.TOKEN_BUCKET, 5)
    assert torch.equal(padded[:rows], t)
    assert not padded[rows:].any()
    if rows % cpu_gemm.TOKEN_BUCKET == 0:
        assert padded is t  # nothing to pad: no copy


class Net(nn.Module):
    """A bias and a bias-free linear, a frozen one, a 3-D input whose token count is not a bucket."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.head = nn.Linear(24, 8)
        self.head.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _grads(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@needs_onednn
@pytest.mark.parametrize("tokens", [(3, 5), (4, 8), (1, 45)])
def test_onednn_linears_give_nn_linear_outputs_and_gradients(tokens):
    torch.manual_seed(0)
    aten = Net()
    onednn = copy.deepcopy(aten)
    assert use_onednn_linears(onednn) == 3
    assert use_onednn_linears(onednn) == 0  # applied once
    x = torch.randn(*tokens, 24)
    out_a, gx_a, grads_a = _grads(aten, x)
    out_b, gx_b, grads_b = _grads(onednn, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-6)
    # up (weight, bias), down (weight), head's bias: the frozen head weight gets none in either
    assert sorted(grads_b) == sorted(grads_a) == ["down.weight", "head.bias", "up.bias", "up.weight"]
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)



@needs_onednn
def test_onednn_linears_keep_no_more_for_backward_than_nn_linear():
    """Each keeps its input (shared with the input's other users), not the padded copy it multiplies:
    backward pads again. Only outputs that something keeps may carry the padded rows (37 -> 64 tokens)."""
    from support.memory import saved_for_backward_bytes

    torch.manual_seed(0)
    aten = Net()
    onednn = copy.deepcopy(aten)
    use_onednn_linears(onednn)
    for tokens, pad_rows in [(64, 0), (37, 27)]:
        x = torch.randn(tokens, 24)
        # relu keeps its output: up's (40 wide) and down's (24) outputs, each with the padded rows
        allowed = saved_for_backward_bytes(aten, x) + pad_rows * 4 * (40 + 24)
        assert saved_for_backward_bytes(onednn, x) <= allowed, tokens

@needs_onednn
def test_onednn_linears_leave_other_dtypes_and_autocast_to_aten():
    torch.manual_seed(0)
    model = Net()
    use_onednn_linears(model)
    calls = []
    for module in model.modules():
        if hasattr(module, "_aten_forward"):
            original = module._aten_forward
            module._aten_forward = lambda x, _f=original: calls.append(1) or _f(x)
    x = torch.randn(2, 3, 24)
    model(x)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert len(calls) == 3
    calls.clear()
    model.to(torch.bfloat16)(x.bfloat16())
    assert len(calls) == 3


def test_engine_follows_the_override_and_the_device(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    monkeypatch.setenv(cpu_gemm.ENV, "aten")
    assert cpu_gemm.engine(cpu, torch.float32, tmp_path / "c.json") == "aten"
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    want = "onednn" if cpu_gemm.onednn_available() else "aten"
    assert cpu_gemm.engine(cpu, torch.float32, tmp_path / "c.json") == want
    # bf16 (torch already sends it to oneDNN) and GPUs keep aten's matmuls, whatever the override
    assert cpu_gemm.engine(cpu, torch.bfloat16, tmp_path / "c.json") == "aten"
    assert cpu_gemm.engine(torch.device("cuda"), torch.float32, tmp_path / "c.json") == "aten"


@needs_onednn
@pytest.mark.parametrize("aten,onednn,want", [(1e11, 2.2e11, "onednn"), (1e11, 1.05e11, "aten"), (2e11, 1e11, "aten")])
def test_auto_picks_onednn_only_where_it_is_clearly_faster(monkeypatch, tmp_path, aten, onednn, want):
    """Measured once per machine, then read from the cache; the MFU peak is the faster engine's rate."""
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    calls = []

    def fake(device, dtype, seconds=0.3, matmul=None):
        calls.append(matmul)
        return onednn if matmul is cpu_gemm.onednn_linear else aten

    monkeypatch.setattr(training.flops, "measured_peak_flops", fake)
    cache = tmp_path / "peak.json"
    cpu = torch.device("cpu")
    assert cpu_gemm.engine(cpu, torch.float32, cache) == want
    assert cpu_gemm.engine(cpu, torch.float32, cache) == want
    assert training.flops.peak_flops(cpu, torch.float32, cache) == max(aten, onednn)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2  # each engine measured once
