"""dnr.ops as a whole: backend report, extension on/off, opcheck and torch.compile of
the compiled kernels. Per-op oracles are in tests/test_ops_*.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dnr.ops
from dnr import _ext

OPS = ["masked_conv2d", "masked_linear", "pgd_step_", "momentum_stats", "masked_sgd_step_", "max_pool2x2", "batch_norm_eval"]


def test_backend_reports_every_op():
    table = dnr.ops.backend()
    assert table["extension_loaded"] is _ext.loaded()
    assert ("reason" in table) is (not _ext.loaded())
    for op in OPS:
        assert set(table[op]) == {"cpu", "cuda"}
        for device in ("cpu", "cuda"):
            assert table[op][device] in ("extension", "reference")
            if table[op][device] == "extension":
                assert _ext.has_kernel(op, device)


def test_has_kernel_rejects_unknown_device():
    with pytest.raises(ValueError, match=r"device_type must be one of \['cpu', 'cuda'\], got 'tpu'"):
        _ext.has_kernel("pgd_step_", "tpu")


def _python(code: str, **env) -> str:
    """Run code in a fresh interpreter that imports this same dnr package."""
    package_root = str(Path(dnr.__file__).resolve().parent.parent)
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_disabled_extension_runs_reference():
    code = (
        "import json, sys, torch, dnr.ops\n"
        "d, xa, x, g = (torch.zeros(2, 3) for _ in range(4))\n"
        "dnr.ops.pgd_step_(d, xa, x, torch.ones(2, 3), 0.1, 0.05)\n"
        "print(json.dumps({'backend': dnr.ops.backend(), 'loaded_C': 'dnr._C' in sys.modules, 'delta': d.flatten().tolist()}))\n"
    )
    out = json.loads(_python(code, DNR_DISABLE_EXT="1").splitlines()[-1])
    table = out["backend"]
    assert table["extension_loaded"] is False
    assert "DNR_DISABLE_EXT" in table["reason"]
    assert all(table[op] == {"cpu": "reference", "cuda": "reference"} for op in OPS)
    assert out["loaded_C"] is False
    assert out["delta"] == pytest.approx([0.05] * 6)


@pytest.mark.skipif(os.environ.get("DNR_REQUIRE_EXT") != "1", reason="set DNR_REQUIRE_EXT=1 where the extension must be built")
def test_extension_is_built():
    """CI sets DNR_REQUIRE_EXT=1: a broken build must fail, not fall back silently."""
    assert _ext.loaded(), _ext.reason()
    for op in ("pgd_step_", "momentum_stats", "masked_sgd_step_", "masked_conv2d", "max_pool2x2", "batch_norm_eval"):
        assert dnr.ops.backend()[op]["cpu"] == "extension"


def _samples(op: str, device: str) -> list[tuple]:
    """Inputs for torch.library.opcheck, in schema order."""
    def r(*shape, dtype=torch.float32, grad=False):
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)

    def m(*shape):
        return torch.rand(shape, device=device) < 0.5

    if op == "pgd_step_":
        return [
            (r(2, 3, 4), r(2, 3, 4), r(2, 3, 4), r(2, 3, 4), torch.tensor(0.1, device=device), torch.tensor([0.01, -0.02], device=device), 0.0, 1.0),
            (*(r(3, 5, dtype=torch.bfloat16) for _ in range(4)), torch.full((3,), 0.1, device=device), torch.tensor(0.01, device=device), -1.0, 1.0),
        ]
    if op == "momentum_stats":
        return [([r(3, 4), r(10)], [m(3, 4), m(10)]), ([r(2, 2, dtype=torch.float64)], [m(2, 2)])]
    if op == "masked_conv2d":
        dead = m(6, 4, 3, 3)
        dead[1:4] = False  # whole output channels pruned: the gather path
        return [(r(2, 4, 6, 6, grad=True), r(6, 2, 3, 3, grad=True), m(6, 2, 3, 3), r(6, grad=True), [1, 1], [1, 1], [1, 1], 2, True),
                (r(2, 4, 6, 6, grad=True), r(6, 4, 3, 3, grad=True), dead, r(6, grad=True), [2, 1], [1, 0], [1, 1], 1, False),
                (r(2, 4, 6, 6, grad=True), r(6, 4, 3, 3, grad=True), m(6, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, True)]
    if op == "masked_conv2d_backward":
        dead = m(6, 4, 3, 3)
        dead[1:4] = False
        return [(r(2, 6, 6, 6, grad=True), r(2, 4, 6, 6, grad=True), r(6, 4, 3, 3, grad=True), mask, [1, 1], [1, 1], [1, 1], 1,
                 dense, need)
                for mask, dense, need in ((m(6, 4, 3, 3), True, [True, True, True]), (dead, False, [True, True, True]),
                                          (dead, True, [False, True, False]), (m(6, 4, 3, 3), False, [True, False, True]))]
    if op == "masked_sgd_step_":
        return [([r(3, 4), r(5)], [r(3, 4), r(5)], [r(3, 4), r(5)], [m(3, 4), m(5)], 0.1, 0.9, 0.0, 5e-4, nesterov, first)
                for nesterov, first in ((False, True), (True, False))]
    if op == "max_pool2x2":  # 1, 3 and 9 windows a row: each of the kernel's row paths
        return [(r(2, 3, 4, 2, grad=True),), (r(2, 3, 7, 7, grad=True),), (r(1, 2, 5, 18, dtype=torch.float64, grad=True),)]
    if op == "max_pool2x2_backward":
        return [(r(2, 3, 2, 1, grad=True), r(2, 3, 4, 2)), (r(2, 3, 3, 3, grad=True), r(2, 3, 7, 7)),
                (r(1, 2, 2, 9, dtype=torch.float64, grad=True), r(1, 2, 5, 18, dtype=torch.float64))]
    if op == "batch_norm_eval":  # planes (4-D, 3-D), rows of channels (2-D), with / without affine
        var = lambda c, dt=torch.float32: torch.rand(c, device=device, dtype=dt) + 0.5  # noqa: E731
        return [(r(2, 3, 4, 5, grad=True), r(3, grad=True), r(3, grad=True), r(3), var(3), 1e-5),
                (r(2, 3, 4, 5, grad=True), None, None, r(3), var(3), 1e-3),
                (r(4, 5, grad=True), r(5), r(5, grad=True), r(5), var(5), 1e-5),
                (r(2, 3, 7, dtype=torch.float64, grad=True), r(3, dtype=torch.float64, grad=True), None,
                 r(3, dtype=torch.float64), var(3, torch.float64), 1e-5)]
    if op == "batch_norm_eval_backward":
        var = lambda c: torch.rand(c, device=device) + 0.5  # noqa: E731
        return [(r(2, 3, 4, 5, grad=True), r(3, grad=True), var(3), 1e-5), (r(2, 3, 4, 5, grad=True), None, var(3), 1e-5),
                (r(4, 5, grad=True), r(5), var(5), 1e-3)]
    raise AssertionError(op)


def _channels_last(args: tuple) -> tuple:
    """The conv samples with their 4-D tensors (masks included) in channels_last."""
    return tuple(a.detach().to(memory_format=torch.channels_last).requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["pgd_step_", "momentum_stats", "masked_conv2d", "masked_conv2d_backward", "masked_sgd_step_",
                                "max_pool2x2", "max_pool2x2_backward", "batch_norm_eval", "batch_norm_eval_backward"])
def test_opcheck(op, layout, device):
    """Schema, fake kernel (shapes and strides), autograd registration (double backward of the conv and of
    the pool included) and torch.compile, on every path: irregular and channel masks, contiguous and
    channels_last."""
    if not _ext.has_kernel(op, device):
        pytest.skip(f"no {device} kernel of dnr::{op} ({_ext.reason() or 'not implemented yet'})")
    samples = _samples(op, device)
    if layout == "channels_last":
        if not op.startswith(("masked_conv2d", "max_pool2x2", "batch_norm_eval")):
            pytest.skip("channels_last samples are for the convolution (the list ops take any layout, tests/test_ops_optim.py)")
        samples = [_channels_last(args) for args in samples]
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.dnr, op).default, args)


@pytest.mark.parametrize("x_layout, w_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous")])
@pytest.mark.parametrize("channel_mask", [False, True], ids=["irregular", "channel"])
def test_masked_conv2d_layout_follows_conv(x_layout, w_layout, channel_mask, device):
    """The output (and the input/weight gradients) are channels_last when input or weight is, whatever
    the mask's values: the gathered path (channel mask) used to return NCHW for channels_last inputs."""
    if not _ext.has_kernel("masked_conv2d", device):
        pytest.skip(f"no {device} kernel of dnr::masked_conv2d")
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x = torch.randn(2, 4, 6, 6, device=device).contiguous(memory_format=fmt[x_layout])
    weight = torch.randn(6, 4, 3, 3, device=device).contiguous(memory_format=fmt[w_layout])
    mask = torch.rand(weight.shape, device=device) < 0.5
    if channel_mask:
        mask[1:4] = False
    out = torch.ops.dnr.masked_conv2d(x, weight, mask, None, [1, 1], [1, 1], [1, 1], 1, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    grads = torch.ops.dnr.masked_conv2d_backward(torch.randn_like(out), x, weight, mask, [1, 1], [1, 1], [1, 1], 1, True,
                                                 [True, True, True])
    for g in grads[:2]:
        assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()


def test_cudagraph_unsafe_tags():
    """Ops that upload a pointer table at every call must not be captured in a CUDA graph: inductor
    keeps tagged ops out of its graphs. The masked convolution reads its mask on the device only
    (no host sync on CUDA) and pgd_step_ is one kernel on device tensors: both may be graphed."""
    if not _ext.loaded():
        pytest.skip(_ext.reason())
    for op in ("momentum_stats", "masked_sgd_step_"):
        assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.dnr, op).default.tags, op
    for op in ("masked_conv2d", "masked_conv2d_backward", "pgd_step_"):
        assert torch.Tag.cudagraph_unsafe not in getattr(torch.ops.dnr, op).default.tags, op


def test_compile_pgd_step(device):
    """The wrapper traces into one graph (fake kernel registered) and computes what eager does."""
    def step(delta, x_adv, x, grad, eps):
        dnr.ops.pgd_step_(delta, x_adv, x, grad, eps, eps / 4, 0.0, 1.0)
        return x_adv * 2

    x = torch.rand(4, 3, 5, device=device)
    grad, eps = torch.randn_like(x), torch.full((4,), 0.1, device=device)
    eager = [torch.zeros_like(x), x.clone()]
    compiled = [torch.zeros_like(x), x.clone()]
    want = step(*eager, x, grad, eps)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled, x, grad, eps)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled[0], eager[0])


def test_compile_momentum_stats(device):
    momenta = [torch.randn(3, 4, device=device), torch.randn(7, device=device)]
    masks = [torch.rand(3, 4, device=device) < 0.5, torch.rand(7, device=device) < 0.5]
    compiled = torch.compile(dnr.ops.momentum_stats, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(momenta, masks), dnr.ops.momentum_stats(momenta, masks))


def test_compile_masked_sgd_and_momentum_stats(device):
    params = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    grads = [torch.randn_like(p) for p in params]
    masks = [torch.rand(p.shape, device=device) < 0.5 for p in params]

    def step(params, bufs):
        dnr.ops.masked_sgd_step_(params, grads, bufs, masks, 0.1, 0.9, 0.0, 1e-3, True, False)
        return [dnr.ops.momentum_stats(params, masks)]

    eager = ([p.clone() for p in params], [torch.ones_like(p) for p in params])
    compiled = ([p.clone() for p in params], [torch.ones_like(p) for p in params])
    want = step(*eager)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    for a, b in zip(got + compiled[0] + compiled[1], want + eager[0] + eager[1]):
        torch.testing.assert_close(a, b)


def test_compile_masked_conv2d_backward(device):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    mask = torch.rand(weight.shape, device=device) < 0.5
    mask[2] = False

    def loss(x, weight):
        return dnr.ops.masked_conv2d(x, weight, mask, None, padding=1).square().sum()

    want = torch.autograd.grad(loss(x, weight), (x, weight))
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x, weight), (x, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------- GPU architectures


@pytest.mark.parametrize("capability, arch_list, has_image", [
    ((9, 0), "8.0;9.0;10.0+PTX", True),     # H100/H200: machine code
    ((8, 6), "8.0;9.0;10.0+PTX", True),     # RTX 30: sm_80 code runs on 8.x
    ((8, 9), "8.0;9.0;10.0+PTX", True),     # L4
    ((12, 0), "8.0;9.0;10.0+PTX", True),    # RTX 50: PTX of 10.0, compiled by the driver
    ((7, 5), "8.0;9.0;10.0+PTX", False),    # T4: older than every entry
    ((8, 0), "9.0", False),                 # the old default on an A100
    ((10, 0), "9.0", False),                # ... and on a B200 (no PTX)
    ((10, 0), "9.0+PTX", True),
    ((9, 0), "8.0 9.0", True),              # spaces separate too
    ((10, 0), "9.0a;10.0a", True),
    ((10, 3), "10.0a", False),              # arch-specific code runs on that GPU only
    ((10, 3), "10.0f", True),               # family code runs on the family
    ((9, 0), "Hopper", True),               # a named architecture cannot be judged: kernels kept
    ((9, 0), "", False),
])
def test_has_kernel_image(capability, arch_list, has_image):
    assert _ext.has_kernel_image(capability, arch_list) is has_image


def test_gpu_without_kernel_image_falls_back_with_one_warning(monkeypatch, caplog):
    """The load-time check, simulated: a T4 (7.5) with a binary built for 9.0 only. The CUDA kernels are
    not used there (dnr.ops runs the reference, backend() says so) and one warning is logged."""
    from dnr.ops import _registry

    monkeypatch.setattr(_ext, "_RUNS_ON", {})
    monkeypatch.setattr(_ext, "_WARNED", False)
    monkeypatch.setattr(_ext, "cuda_arch_list", lambda: "9.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(_registry._USABLE, ("pgd_step_", "cuda"), True)  # as in a CUDA build
    with caplog.at_level("WARNING", logger="dnr.ops"):
        assert not _registry.use_kernel("pgd_step_", torch.device("cuda", 0))
        assert not _registry.use_kernel("pgd_step_", torch.device("cuda", 1))
        assert dnr.ops.backend()["pgd_step_"]["cuda"] == "reference"
    warnings = [r for r in caplog.records if r.name == "dnr.ops"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "no kernel image for Tesla T4 (compute capability 7.5)" in warnings[0].getMessage()
    assert "TORCH_CUDA_ARCH_LIST='9.0'" in warnings[0].getMessage()
    assert "PyTorch reference" in warnings[0].getMessage()
    # a GPU that has an image keeps the kernels, without a warning
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    caplog.clear()
    assert _registry.use_kernel("pgd_step_", torch.device("cuda", 2))
    assert not caplog.records


def _fatbin_archs(path: Path) -> tuple[set[int], set[int]]:
    """(SASS archs, PTX archs) of every CUDA fat binary embedded in the shared library at path, read from
    the fatbin headers (magic 0xBA55ED50; entries: u16 kind 1=PTX 2=ELF, u16, u32 header size,
    u64 payload size, ..., u32 arch at offset 28), so the test reads the binary itself, not a record."""
    import struct

    data = path.read_bytes()
    sass, ptx = set(), set()
    start = data.find(b"\x50\xed\x55\xba")
    while start != -1:
        version, header_size, fat_size = struct.unpack_from("<HHQ", data, start + 4)
        if (version, header_size) != (1, 16):  # the magic's bytes by chance, not a fat binary
            start = data.find(b"\x50\xed\x55\xba", start + 4)
            continue
        entry, end = start + header_size, start + header_size + fat_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            (ptx if kind == 1 else sass).add(arch)
            entry += entry_header + payload
        start = data.find(b"\x50\xed\x55\xba", end)
    return sass, ptx


def _cuda_build() -> bool:
    return _ext.loaded() and _ext.has_kernel("pgd_step_", "cuda")


@pytest.mark.skipif(not _cuda_build(), reason="not a CUDA build of the extension")
def test_binary_carries_the_recorded_architectures():
    """The arch list recorded in the binary (what the load-time check trusts) is what its fat binaries hold."""
    recorded = _ext.cuda_arch_list()
    entries = [e for e in recorded.replace(" ", ";").split(";") if e]
    want_sass = {int(e.split("+")[0].replace(".", "").rstrip("af")) for e in entries}
    want_ptx = {int(e.split("+")[0].replace(".", "").rstrip("af")) for e in entries if e.endswith("+PTX")}
    sass, ptx = _fatbin_archs(Path(sys.modules["dnr._C"].__file__))
    assert (sass, ptx) == (want_sass, want_ptx), recorded


@pytest.mark.skipif(os.environ.get("DNR_REQUIRE_EXT") != "1" or not _cuda_build(),
                    reason="set DNR_REQUIRE_EXT=1 where the CUDA build must be portable (CI, benchmarks/run_gpu.sh)")
def test_binary_covers_several_gpu_generations():
    """A shipped binary runs on more than one GPU generation (one arch per build made every other GPU fail)."""
    sass, ptx = _fatbin_archs(Path(sys.modules["dnr._C"].__file__))
    assert len({arch // 10 for arch in sass}) >= 2, f"machine code only for {sorted(sass)}"
    assert ptx, "no PTX for GPUs newer than the list"
