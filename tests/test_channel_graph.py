"""dnr.nn.channel_graph: the channel-preserving table shared by compaction, CaP and DNR's channel signal."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dnr.nn import sparsify
from dnr.nn.channel_graph import (ChannelTracer, is_add, is_channelwise, is_flatten, is_zero_preserving, node_channels,
                                  node_shape, trace_with_shapes)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        a = self.act(self.conv(x))
        b = torch.sigmoid(a) + a          # channel-wise with f(0) != 0, then a residual-style sum
        c = torch.cat([self.gate(b), a], 1)  # mixes two tensors' channels: no kind of pass
        d = c[:, :4] * F.relu(a)          # a product of two tensors: no pass either
        return self.head(d.flatten(1))


def classify(gm):
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        kinds = [k for k, f in (("zero", lambda n: is_zero_preserving(n, modules)),
                                ("channelwise", lambda n: is_channelwise(n, modules)),
                                ("flatten", lambda n: is_flatten(n, modules)), ("add", is_add)) if f(node)]
        out[node.name] = kinds
    return out


def test_each_node_kind_is_classified_by_the_table():
    gm = trace_with_shapes(Net(), torch.rand(2, 3, 8, 8))
    kinds = classify(gm)
    assert kinds["act"] == ["zero", "channelwise"]
    assert kinds["relu"] == ["zero", "channelwise"]           # F.relu
    assert kinds["sigmoid"] == ["channelwise"]                # torch.sigmoid: f(0) = 1/2
    assert kinds["gate"] == ["channelwise"]                   # nn.Sigmoid
    assert kinds["add"] == ["add"]
    assert kinds["flatten"] == ["flatten"]
    for name in ("cat", "mul", "conv", "head", "getitem"):
        assert kinds[name] == [], name


def test_shapes_are_recorded_for_every_tensor_node():
    gm = trace_with_shapes(Net(), torch.rand(2, 3, 8, 8))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert node_shape(nodes["conv"]) == (2, 4, 8, 8)
    assert node_channels(nodes["cat"]) == 8
    assert node_shape(nodes["flatten"]) == (2, 256) and node_channels(nodes["flatten"]) == 256
    assert node_shape("not a node") is None
    unrun = next(n for n in ChannelTracer().trace(Net()).nodes if n.name == "conv")  # traced, never run
    assert node_shape(unrun) is None and node_channels(unrun) is None


def test_masked_layers_are_leaves():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    sparsify(model, density=0.5, generator=torch.Generator().manual_seed(0))
    graph = ChannelTracer().trace(model)
    assert [n.op for n in graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


@pytest.mark.parametrize("error", [ValueError, KeyError])
def test_an_untraceable_forward_raises_the_callers_error_with_its_purpose(error):
    with pytest.raises(error, match="cannot trace Branchy with torch.fx .*; compaction needs a forward"):
        trace_with_shapes(Branchy(), torch.rand(1, 2), error=error, purpose="compaction")


def test_the_shape_run_uses_the_models_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    before = model[1].running_mean.clone()
    trace_with_shapes(model, torch.rand(4, 1, 3, 3) + 1)
    assert torch.equal(model[1].running_mean, before)  # eval: statistics untouched
    trace_with_shapes(model.train(), torch.rand(4, 1, 3, 3) + 1)
    assert not torch.equal(model[1].running_mean, before)
