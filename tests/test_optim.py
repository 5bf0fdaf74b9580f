"""dnr.optim.MaskedSGD against torch.optim.SGD followed by a mask multiply (the oracle), bit for bit."""

import copy

import pytest
import torch
from torch import nn

import dnr
import dnr.ops
from dnr.optim import MaskedSGD

# (momentum, dampening, weight_decay, nesterov)
CASES = [(0.9, 0.0, 5e-4, False), (0.9, 0.0, 5e-4, True), (0.8, 0.1, 0.0, False), (0.0, 0.0, 1e-2, False),
         (0.5, 0.0, 0.0, True)]


def _params(device, dtype=torch.float32):
    # odd sizes: vector tails; 40001 > the CPU kernel's grain (several threads)
    shapes = [(6, 3, 3, 3), (40001,), (7,), (10, 4)]
    masks = [torch.rand(s, device=device) < 0.4 for s in shapes]
    params = [nn.Parameter(torch.randn(s, dtype=dtype, device=device) * k) for s, k in zip(shapes, masks)]
    return params, masks


def _run(opt, params, grads_per_step, after=None):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        if after is not None:
            after()


@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov", CASES)
def test_matches_sgd_and_mask_multiply_exactly(momentum, dampening, weight_decay, nesterov, device):
    params, masks = _params(device)
    masked = params[:3]  # the last parameter has no mask: plain SGD
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    opt = MaskedSGD(params, masks={p: k for p, k in zip(masked, masks)}, **hyper)
    sgd = torch.optim.SGD(ref, foreach=False, **hyper)

    def mask_ref():
        with torch.no_grad():
            for p, k in zip(ref[:3], masks):
                p.mul_(k)

    steps = [[torch.randn_like(p) for p in params] for _ in range(4)]
    _run(opt, params, steps)
    _run(sgd, ref, steps, after=mask_ref)
    for p, want in zip(params, ref):
        assert torch.equal(p, want), (p - want).abs().max()
        if momentum:
            assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[want]["momentum_buffer"])
    for p, k in zip(masked, masks):
        assert torch.all(p[~k] == 0)
        if momentum:
            assert opt.state[p]["momentum_buffer"][~k].abs().sum() > 0, "momentum must stay dense"


def test_model_masks_are_looked_up_every_step():
    torch.manual_seed(1)
    model = dnr.sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)), density=0.3)
    ref = copy.deepcopy(model)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, model=model)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    for step in range(3):
        if step == 2:  # a new pattern, as rewiring sets it
            for m in (model, ref):
                layer = dnr.masked_layers(m)[0][1]
                layer.set_mask(torch.ones_like(layer.mask))
        for m, o in ((model, opt), (ref, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        dnr.apply_masks(ref)
    for (name, p), want in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, want), name


def test_uses_the_fused_op_for_masked_parameters(monkeypatch):
    """One fused call per step for the masked parameters: the compiled op when built, else the wrapper."""
    from dnr.ops._registry import use_kernel

    calls = []
    real = dnr.ops.masked_sgd_step_
    monkeypatch.setattr(dnr.ops, "masked_sgd_step_", lambda *a, **k: (calls.append(k["first_step"]), real(*a, **k)))
    params, masks = _params("cpu")
    opt = MaskedSGD(params, lr=0.1, momentum=0.9, masks=dict(zip(params[:3], masks)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    if use_kernel("masked_sgd_step_", torch.device("cpu")):
        assert [e.name for e in prof.events()].count("dnr::masked_sgd_step_") == 2
    else:
        assert calls == [True, False]


def test_lr_scheduler_and_param_groups():
    params, masks = _params("cpu")
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.01, "weight_decay": 1e-2}]  # noqa: E731
    opt = MaskedSGD(groups(params), lr=0.1, momentum=0.9, masks=dict(zip(params, masks)))
    sgd = torch.optim.SGD(groups(ref), lr=0.1, momentum=0.9, foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, sgd)]

    def mask_ref():
        with torch.no_grad():
            for p, k in zip(ref, masks):
                p.mul_(k)

    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        _run(opt, params, [grads])
        _run(sgd, ref, [grads], after=mask_ref)
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    for p, want in zip(params, ref):
        assert torch.equal(p, want)


def test_state_dict_round_trip(tmp_path):
    params, masks = _params("cpu")
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    steps = [[torch.randn_like(p) for p in params] for _ in range(4)]
    whole = MaskedSGD(params, lr=0.1, momentum=0.9, nesterov=True, masks=dict(zip(params, masks)))
    _run(whole, params, steps)

    first = MaskedSGD(twin, lr=0.1, momentum=0.9, nesterov=True, masks=dict(zip(twin, masks)))
    _run(first, twin, steps[:2])
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    second = MaskedSGD(twin, lr=0.1, momentum=0.9, nesterov=True, masks=dict(zip(twin, masks)))
    second.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _run(second, twin, steps[2:])
    for p, want in zip(twin, params):
        assert torch.equal(p, want)


def test_with_dnr_controller_same_as_sgd():
    """The DNR controller reads MaskedSGD's momentum ("momentum_buffer") as SGD's: same rewiring, same weights."""
    from dnr.models import small_cnn

    def build():
        torch.manual_seed(3)
        return dnr.sparsify(small_cnn(), density=0.2, generator=torch.Generator().manual_seed(0))

    runs = []
    for make in (lambda m: MaskedSGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, model=m),
                 lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)):
        model = build()
        opt = make(model)
        rewiring = dnr.DNR(model, opt, total_steps=6)
        torch.manual_seed(4)
        for _ in range(3):
            x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        record = rewiring.rewire()
        runs.append((model, record))
    (a, rec_a), (b, rec_b) = runs
    assert rec_a["pruned"] == rec_b["pruned"] > 0
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def _opt_errors():
    p = nn.Parameter(torch.randn(3, 4))
    other = nn.Parameter(torch.randn(2))
    return [
        (dict(masks={p: torch.ones(3, 4)}), TypeError,
         r"the mask of a parameter of shape \(3, 4\) must be a bool tensor, got torch\.float32"),
        (dict(masks={p: torch.ones(4, 3, dtype=torch.bool)}), ValueError,
         r"the mask of a parameter of shape \(3, 4\) on cpu must match it, got shape \(4, 3\) on cpu"),
        (dict(masks={other: torch.ones(2, dtype=torch.bool)}), ValueError,
         r"masks entry 0 \(shape \(2,\)\) is not a parameter of this optimizer"),
        (dict(masks=[torch.ones(3, 4, dtype=torch.bool)]), TypeError, r"masks must be a dict \{parameter: bool mask\}, got list"),
        (dict(masks={}, model=nn.Linear(2, 2)), ValueError, r"pass masks or model, not both"),
        (dict(model="net"), TypeError, r"model must be a torch\.nn\.Module, got str"),
        (dict(masks={}, momentum=-1.0), ValueError, r"Invalid momentum value: -1\.0"),
    ], p


@pytest.mark.parametrize("case", range(7))
def test_errors(case):
    errors, p = _opt_errors()
    kwargs, error, message = errors[case]
    with pytest.raises(error, match=message):
        MaskedSGD([p], **{"lr": 0.1, **kwargs})


def test_mask_error_in_step_modifies_nothing():
    p = nn.Parameter(torch.randn(3, 4))
    q = nn.Parameter(torch.randn(5))
    masks = {p: torch.ones(3, 4, dtype=torch.bool), q: torch.ones(5, dtype=torch.bool)}
    opt = MaskedSGD([q, p], lr=0.1, momentum=0.9, masks=masks)
    masks[p] = torch.ones(3, 4)  # the dict is copied at construction: changing it later has no effect
    opt._masks[p] = torch.ones(3, 4)  # a broken mask appears later
    before = [p.detach().clone(), q.detach().clone()]
    p.grad, q.grad = torch.ones(3, 4), torch.ones(5)
    with pytest.raises(TypeError, match=r"must be a bool tensor"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])


def test_channels_last_model_keeps_the_fused_step_and_matches_sgd(monkeypatch):
    """A model in channels_last (--channels-last) still takes the fused kernel, bit for bit SGD + masks."""
    from dnr import _ext, reference
    from dnr.models import build_model
    from dnr.nn import apply_masks, sparsify

    if not _ext.has_kernel("masked_sgd_step_", "cpu"):
        pytest.skip("no compiled masked_sgd_step_")
    monkeypatch.setattr(reference, "masked_sgd_step_", lambda *a, **k: pytest.fail("fell back to the reference"))
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 28, (0.5,), (0.25,))
    sparsify(model, density=0.2, generator=torch.Generator().manual_seed(0))
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    opt = MaskedSGD(model.parameters(), model=model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for p, q, gr in zip(model.parameters(), twin.parameters(), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        sgd.step()
        apply_masks(twin)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    conv = model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv]["momentum_buffer"].stride() == conv.stride()
