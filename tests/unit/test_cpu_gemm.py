"""training/kernels/cpu_gemm.py: oneDNN linears against aten's, the token padding, and how the job's one
engine is chosen (training/kernels/__init__.py): once, by rank 0 where the plan left it open."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support.onednn import needs_onednn
from torch import nn

import training.flops
from training.kernels import cpu_gemm, resolve_cpu_matmul
from training.kernels.cpu_gemm import engine_scope, linear, pad_tokens, use_onednn_linears


@pytest.mark.parametrize("rows", [0, 1, 31, 32, 33, 70])
def test_pad_tokens_appends_zero_rows_up_to_the_bucket(rows):
    t = torch.randn(rows, 5)
    with engine_scope("aten"):
        assert pad_tokens(t) is t
    with engine_scope("onednn"):
        padded = pad_tokens(t)
        assert pad_tokens(t.double()).shape == t.shape  # oneDNN's engine is for fp32 operands only
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


def test_engine_follows_the_job_key_and_the_device(tmp_path):
    threads, cache = torch.get_num_threads(), tmp_path / "c.json"
    assert resolve_cpu_matmul("aten", "cpu", "fp32", threads, cache) == "aten"
    want = "onednn" if cpu_gemm.onednn_available() else "aten"
    assert resolve_cpu_matmul("onednn", "cpu", "fp32", threads, cache) == want
    # bf16 (torch already sends it to oneDNN) and GPUs keep aten's matmuls, whatever the job asks
    assert resolve_cpu_matmul("onednn", "cpu", "bf16", threads, cache) == "aten"
    assert resolve_cpu_matmul("onednn", "cuda", "fp32", threads, cache) == "aten"
    assert not cache.exists()  # nothing measured for a choice the job made
    # auto where the ranks run on machines the planner does not see: left to them
    assert resolve_cpu_matmul("auto", "cpu", "fp32", None, cache) is None
    assert resolve_cpu_matmul("auto", "cuda", "bf16", None, cache) == "aten"


def test_linear_follows_the_process_engine_for_fp32_cpu_operands_only(monkeypatch):
    calls = []
    onednn = cpu_gemm.onednn_linear
    monkeypatch.setattr(cpu_gemm, "onednn_linear", lambda *a: calls.append(a[0].dtype) or onednn(*a))
    x, w = torch.randn(6, 8), torch.randn(4, 8)
    with engine_scope("aten"):
        aten = linear(x, w)
    assert calls == [] and cpu_gemm.current_engine() == "aten"
    with engine_scope("onednn"):
        linear(x.double(), w.double())  # aten's: oneDNN's engine is for fp32
        assert calls == [] and cpu_gemm.current_engine() == "onednn"
        if cpu_gemm.onednn_available():
            torch.testing.assert_close(linear(x, w), aten, rtol=1e-5, atol=1e-6)
            assert calls == [torch.float32]
    assert cpu_gemm.current_engine() == "aten"  # the scope put it back


@needs_onednn
@pytest.mark.parametrize("aten,onednn,want", [(1e11, 2.2e11, "onednn"), (1e11, 1.05e11, "aten"), (2e11, 1e11, "aten")])
def test_auto_picks_onednn_only_where_it_is_clearly_faster(monkeypatch, tmp_path, aten, onednn, want):
    """Measured once per machine, then read from the cache; the MFU peak is the faster engine's rate."""
    calls = []

    def fake(device, dtype, seconds=0.3, matmul=None):
        calls.append(matmul)
        return onednn if matmul is cpu_gemm.onednn_linear else aten

    monkeypatch.setattr(training.flops, "measured_peak_flops", fake)
    cache = tmp_path / "peak.json"
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    assert resolve_cpu_matmul("auto", "cpu", "fp32", threads, cache) == want
    assert resolve_cpu_matmul("auto", "cpu", "fp32", threads, cache) == want
    assert training.flops.peak_flops(cpu, torch.float32, cache) == max(aten, onednn)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2  # each engine measured once
