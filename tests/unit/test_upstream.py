"""The library code training/kernels/ copies or patches is the code installed: an upstream change fails
here, naming the function and what of the kernel to re-check, instead of the copy drifting silently."""

from __future__ import annotations

import importlib
import textwrap

import pytest

from training.kernels import upstream_digest

KERNELS = ("attention", "fused_loss", "last_layer", "lora_fused")
PINS = [
    (kernel, name, digest, what)
    for kernel in KERNELS
    for name, (digest, what) in importlib.import_module(f"training.kernels.{kernel}").UPSTREAM.items()
]


def package_version(name: str) -> str:
    return getattr(importlib.import_module(name.split(".")[0]), "__version__", "?")


@pytest.mark.parametrize("kernel,name,digest,what", PINS, ids=[f"{k}:{n.rsplit('.', 2)[-2]}" for k, n, _, _ in PINS])
def test_copied_library_code_is_the_installed_code(kernel, name, digest, what):
    installed = upstream_digest(name)
    assert installed == digest, (
        f"{name} changed in the installed {name.split('.')[0]} {package_version(name)} (digest {installed}, "
        f"pinned {digest}). Re-check {what}; the numeric tests (tests/test_{kernel}.py) must pass, then pin "
        f'the new digest in training/kernels/{kernel}.py UPSTREAM["{name}"].'
    )


def test_every_copying_kernel_pins_something():
    assert {kernel for kernel, *_ in PINS} == set(KERNELS)
    assert any("LlamaDecoderLayer.forward" in name for _, name, _, _ in PINS)


def test_the_digest_sees_code_and_not_its_comments(tmp_path, monkeypatch):
    """A docstring, a comment or a re-wrapped line keeps the digest; a changed statement does not."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def digest_of(source: str, module: str) -> str:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return upstream_digest(f"{module}.Layer.forward")

    plain = digest_of(
        """
        class Layer:
            def forward(self, x):
                return self.mlp(x) + x
        """,
        "_pin_plain",
    )
    commented = digest_of(
        '''
        class Layer:
            def forward(
                self, x,
            ):
                """The residual block."""
                # the MLP, then the residual
                return self.mlp(x) + x
        ''',
        "_pin_commented",
    )
    changed = digest_of(
        """
        class Layer:
            def forward(self, x):
                return self.mlp(self.norm(x)) + x
        """,
        "_pin_changed",
    )
    assert plain == commented != changed
