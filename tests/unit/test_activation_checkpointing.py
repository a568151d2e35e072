"""Selective activation checkpointing (strategies/activation_checkpointing.py): the loss and gradients of no
checkpointing, and less kept for the backward than without, more than with full checkpointing. Offload: full's
loss and gradients exactly, with each decoder layer's kept input, and nothing else, handed to the hooks that
move it to host memory.

The models are built as a rank builds them (training/model.py), with what the worker adds on a CPU: the
fused LoRA linear (oneDNN's matmuls too, where available) and the pruned last layer, which calls the
checkpoint function itself; then the strategy turns checkpointing on (Strategy.prepare_model). Adapters
have dropout, so the recompute must draw the forward's masks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.e2e import ALPACA
from support.kernel_inputs import LENGTHS, completion_rows
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from launcher import shapes as memory
from launcher.spec import JobSpec
from strategies import activation_checkpointing
from strategies.activation_checkpointing import LOW_RANK, MODES, SelectivePolicy, checkpoint_kwargs
from strategies.base import DistEnv, StrategyOptions
from strategies.single import SingleStrategy
from training.data.packing import collate
from training.kernels.attention import PER_SAMPLE_SDPA
from training.kernels.cpu_gemm import engine_scope, onednn_available
from training.kernels.last_layer import prune_last_layer
from training.kernels.lora_fused import fuse_lora_linears
from training.methods.causal_lm import CausalLMLoss
from training.model import load_model

VARIANTS = [
    "full",
    "lora",  # PEFT's LoRA linear
    "lora-fused",
    pytest.param("lora-fused-onednn", marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN")),
    "qlora",
]


def build(model_dir: Path, variant: str, mode: str) -> torch.nn.Module:
    finetune = variant.split("-")[0]
    spec = JobSpec.model_validate({
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "finetune": {"type": finetune, "r": 4, "alpha": 8, "dropout": 0.0 if finetune == "full" else 0.1},
        "data": {"train": [{"path": str(ALPACA)}]},
        "device": "cpu",
    })  # fmt: skip
    torch.manual_seed(0)
    model = load_model(spec, "fp32", torch.device("cpu"))
    with torch.no_grad():  # B starts at zero: give the adapters a say in the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    if "fused" in variant:
        assert fuse_lora_linears(model)
    assert prune_last_layer(model)
    SingleStrategy(StrategyOptions(gradient_checkpointing=mode), DistEnv()).prepare_model(model)
    return model


@pytest.fixture(autouse=True)
def cpu_matmul_engine(request):
    """The -onednn variant runs with this process's CPU matmul engine on oneDNN (training/kernels/cpu_gemm.py)."""
    variant = request.node.callspec.params.get("variant", "") if hasattr(request.node, "callspec") else ""
    with engine_scope("onednn" if variant.endswith("onednn") else "aten"):
        yield


def batch():
    return collate(completion_rows(LENGTHS), attention=PER_SAMPLE_SDPA)


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the adapters' dropout masks
    loss = CausalLMLoss()(model, batch()).loss_sum
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_selective_gives_the_loss_and_gradients_of_none_and_full(tiny_model, variant):
    want_loss, want = loss_and_grads(build(tiny_model, variant, "none"))
    assert want and all(g.abs().sum() > 0 for g in want.values())
    for mode in ("selective", "full"):
        loss, grads = loss_and_grads(build(tiny_model, variant, mode))
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        assert grads.keys() == want.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want[name], rtol=1e-6, atol=1e-8, msg=f"{mode}: {name}")


def held_for_backward(model: torch.nn.Module) -> int:
    """Bytes the CPU allocator holds at the end of the forward and loss that it did not before: what the
    graph keeps for the backward. Counted by the allocator, since checkpointing keeps its tensors out of
    reach of saved-tensor hooks (its own hooks replace them inside a layer, and its cache is its own)."""
    from support.memory import allocated_during

    loss_and_grads(model)  # once before: lazy initialisations (oneDNN kernels, grads) are not counted
    micro = batch()
    loss, allocated = allocated_during(lambda: CausalLMLoss()(model, micro).loss_sum)
    loss.backward()
    return allocated[-1]


@pytest.mark.parametrize("variant", ["full", "lora", "lora-fused"])
def test_selective_keeps_less_than_none_and_more_than_full(tiny_model, variant):
    held = {mode: held_for_backward(build(tiny_model, variant, mode)) for mode in MODES}
    assert held["none"] > held["selective"] > held["full"] > 0, held
    assert held["offload"] == held["full"], held  # on a CPU the inputs already are in host memory: kept as they are


@pytest.mark.parametrize("variant", VARIANTS)
def test_offload_gives_exactly_the_loss_and_gradients_of_full(tiny_model, variant):
    want_loss, want = loss_and_grads(build(tiny_model, variant, "full"))
    loss, grads = loss_and_grads(build(tiny_model, variant, "offload"))
    assert torch.equal(loss, want_loss) and grads.keys() == want.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, want[name]), name


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_offload_hands_each_layer_input_and_nothing_else_to_the_host(tiny_model, variant, monkeypatch):
    """The hooks around each checkpoint see one tensor in the forward, the layer's input [1, tokens, hidden]
    (the pruned last layer's too), and give it back once for the recompute; the layer's own saved tensors
    stay under the checkpoint's hooks. On this CPU-only machine nothing moves (the tensor stays where it is):
    what device memory this frees is a GPU's figure."""
    packed, unpacked = [], []

    real_to_host, real_from_host = activation_checkpointing.to_host, activation_checkpointing.from_host
    monkeypatch.setattr(activation_checkpointing, "to_host", lambda t: (packed.append(t), real_to_host(t))[1])
    monkeypatch.setattr(activation_checkpointing, "from_host", lambda p: (unpacked.append(p), real_from_host(p))[1])
    model = build(tiny_model, variant, "offload")
    config = model.config
    micro = batch()
    tokens = micro.model_inputs()["input_ids"].shape[1]
    loss = CausalLMLoss()(model, micro).loss_sum
    assert [tuple(t.shape) for t in packed] == [(1, tokens, config.hidden_size)] * config.num_hidden_layers
    assert all(t.requires_grad for t in packed)  # hidden states, not a mask or position ids
    assert unpacked == []
    loss.backward()
    assert len(unpacked) == config.num_hidden_layers
    assert [t is p[1] for t, p in zip(packed, reversed(unpacked), strict=True)] == [True] * len(packed)


def test_offload_is_installed_once_and_keeps_a_cpu_tensor_where_it_is(tiny_model):
    model = build(tiny_model, "full", "offload")
    SingleStrategy(StrategyOptions(gradient_checkpointing="offload"), DistEnv()).prepare_model(model)  # again
    functions = {id(m._gradient_checkpointing_func) for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")}
    assert len(functions) == 1
    function = next(m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func"))
    assert function.offloads_inputs and not getattr(function.__wrapped__, "offloads_inputs", False)
    x = torch.ones(2, 3)
    device, kept = activation_checkpointing.to_host(x)
    assert device is None and kept is x and activation_checkpointing.from_host((device, kept)) is x


def test_the_policy_keeps_full_rank_matmuls_and_in_place_writes_into_them():
    """Op by op: a full-rank matmul's output and an in-place add into it are kept, a product through a
    rank-2 bottleneck (LoRA's B) is not, nor is anything cheap; recomputing those gives the same gradients."""
    x = torch.randn(16, 32, requires_grad=True)
    w, a, b = torch.randn(32, 32), torch.randn(2, 32), torch.randn(2 * LOW_RANK, 2)
    decisions, policy = [], SelectivePolicy()

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((op.name(), decision == CheckpointPolicy.MUST_SAVE))
        return decision

    def block(x):
        low = (x @ a.t()) @ b.t()  # A's [16, 2] output is kept, B's [16, 16] recomputed
        out = x @ w
        out.add_(1.0)  # in place into a kept output that nothing read before
        return torch.relu(out).sum() + low.sin().sum()

    def contexts():
        return create_selective_checkpoint_contexts(recording, allow_cache_entry_mutation=True)

    checkpointed = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=contexts)
    assert [d for d in decisions if d[1]] == [("aten::mm", True), ("aten::mm", True), ("aten::add_.Tensor", True)]
    assert [d for d in decisions if d[0] == "aten::mm"] == [("aten::mm", True), ("aten::mm", False), ("aten::mm", True)]
    (want,) = torch.autograd.grad(block(x), x)
    (got,) = torch.autograd.grad(checkpointed, x)
    torch.testing.assert_close(got, want)
    assert memory.LOW_RANK == LOW_RANK  # the planner models the same rule


def test_a_kept_output_read_and_then_changed_in_place_is_refused():
    """The recompute would read the changed values: the policy stops the forward instead of computing
    wrong gradients."""
    x = torch.randn(8, 8, requires_grad=True)

    def block(x):
        out = x @ x
        doubled = out * 2  # recomputed: in the backward it would read `out` after the add below
        out.add_(1.0)
        return (doubled + out).sum()

    with pytest.raises(RuntimeError, match="writes in place into a kept matmul"):
        torch.utils.checkpoint.checkpoint(block, x, **checkpoint_kwargs("selective"))
