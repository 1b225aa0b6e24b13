"""The layer path of robustattr.influence (per-sample gradients, norms and dot products from the layer inputs and
output gradients of one batched backward) against torch.func's per-sample gradients and Captum's TracInCP, in
float64 at 1e-6 relative; its automatic choice and fallback; the self-influence monitor on it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustattr.data import DigitsDataModule
from robustattr.errors import ConfigError
from robustattr.influence import CGInfluence, ExactInfluence, TracIn, TrainingSet, resolve_scope
from robustattr.influence.layers import LayerGradients, layer_gradients, unsupported
from robustattr.models import SmallCNN

REL = 1e-6


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.prepare_data()
    x, y = TrainingSet.from_datamodule(dm).tensors(range(160))
    return x, y


class Odd(nn.Module):
    """Grouped, strided, dilated and padded convolutions without bias, an in-place ReLU right after a convolution,
    BatchNorm, and a Linear layer on (B, T, in) inputs: every case of the layer path."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, (2, 3), padding="valid")
        self.tokens = nn.Linear(4, 5)
        self.head = nn.Linear(5 * 4, 10)

    def forward(self, x):
        h = F.relu_(self.conv1(x))
        h = torch.tanh(self.bn(self.conv2(h)))
        h = self.conv3(h)  # (B, 4, H, W)
        t = self.tokens(h.flatten(2).transpose(1, 2)[:, :4])  # (B, 4 tokens, 5)
        return self.head(torch.sin(t).flatten(1))


def _odd():
    torch.manual_seed(0)
    net = Odd()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval().double()


def _func_gradients(model, scope, x, y):
    influence = ExactInfluence(scope=scope, per_sample="torch.func", max_parameters=10**9)
    influence.model, influence.scope = model, resolve_scope(model, scope)
    return influence.gradients(x, y)


@pytest.mark.parametrize("gram", [None, True, False])
@pytest.mark.parametrize("scope", ["all", ["conv2", "bn", "tokens"], ["head"]])
def test_per_sample_gradients_norms_and_dots_equal_torch_func(digits, scope, gram):
    net = _odd()
    x, y = digits[0][:12].double(), digits[1][:12]
    resolved = resolve_scope(net, scope)
    assert unsupported(net, resolved) is None
    reference = _func_gradients(net, scope, x, y)
    path = LayerGradients(resolved.modules, gram=gram)
    batch = path.capture(net, x, y)
    assert path.forward_only == (scope == ["head"])  # the logits' layer needs no backward
    assert rel(batch.dense(), reference) < REL
    assert rel(batch.squared_norms(), reference.pow(2).sum(1)) < REL
    queries = path.capture(net, x[:3], y[:3])
    assert rel(batch.dots(queries), reference[:3] @ reference.T) < REL
    vectors = torch.randn(4, reference.shape[1], dtype=torch.float64)
    assert rel(batch.dot_vectors(vectors), reference @ vectors.T) < REL


def test_unsupported_scopes_fall_back_to_torch_func_and_say_why(digits):
    class Shared(nn.Module):  # one Linear used twice: its per-sample gradient is a sum the hooks do not see
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(torch.tanh(self.body(torch.tanh(self.body(x.flatten(1))))))

    x, y = digits
    train = TrainingSet.from_tensors(x[:40], y[:40])
    torch.manual_seed(0)
    shared = Shared().eval()
    auto = TracIn(["a.pt", "b.pt"], scope=["body"], learning_rates=[1, 1])
    auto.model, auto.train = shared, train  # the path is chosen before the checkpoints are read
    auto.scope = resolve_scope(shared, ["body"])
    auto.layers, auto.per_sample_path = layer_gradients(shared, auto.scope, "auto")
    auto._verify_layers()
    assert auto.layers is None and auto.per_sample_path.startswith("torch.func (") and "twice" in auto.per_sample_path
    assert ExactInfluence(scope="last").fit(shared, train).self_influence().settings["per_sample"] == "layers"
    ln = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 10)).eval()
    with pytest.raises(ConfigError, match="per_sample 'layers' cannot serve this scope: 2: LayerNorm"):
        ExactInfluence(scope="all", per_sample="layers").fit(ln, train)
    path = ExactInfluence(scope="all", curvature="ggn").fit(ln, train).per_sample_path
    assert path.startswith("torch.func (2: LayerNorm")
    with pytest.raises(ConfigError, match="per_sample must be one of"):
        TracIn(["a", "b"], per_sample="fast")


def _checkpoints(net, tmp_path, count=3):
    paths, lrs = [], []
    model = copy.deepcopy(net)
    torch.manual_seed(1)
    for i in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        paths.append(str(tmp_path / f"c{i}.pt"))
        torch.save(model.state_dict(), paths[-1])
        lrs.append(0.1 / (i + 1))
    return paths, lrs


CONVS = ["features.0", "features.3", "features.6", "features.9", "classifier"]


@pytest.mark.parametrize("scope", ["last", "all", CONVS, ["features.6", "classifier"]])
def test_tracin_on_the_layer_path_equals_torch_func_and_captum(digits, tmp_path, scope):
    """Captum's per-sample hooks cover Linear and Conv2d only, so the scope with BatchNorm ("all") is compared with
    torch.func alone."""
    from captum.influence import TracInCP

    torch.manual_seed(0)
    net = SmallCNN(width=4).eval()
    x, y = digits
    train = TrainingSet.from_tensors(x[:120], y[:120])
    xq, yq = x[140:146], y[140:146]
    paths, lrs = _checkpoints(net, tmp_path)
    fast = TracIn(paths, scope=scope, learning_rates=lrs, dtype=torch.float64, batch_size=50).fit(net, train)
    slow = TracIn(paths, scope=scope, learning_rates=lrs, dtype=torch.float64, per_sample="torch.func").fit(net, train)
    assert fast.per_sample_path == "layers" and slow.per_sample_path == "torch.func (asked)"
    ours_self, ours_scores = fast.self_influence(), fast.scores(xq, yq)
    assert ours_self.settings["per_sample"] == "layers"
    assert rel(ours_self.values, slow.self_influence().values) < REL
    assert rel(ours_scores.values, slow.scores(xq, yq).values) < REL
    signals, reference = fast.training_signals(), slow.training_signals()
    for key in ("self_influence", "loss", "gradient_norm"):
        assert rel(signals[key], reference[key]) < REL, key

    layers = fast.scope.modules
    if scope == "all":
        return
    model = copy.deepcopy(net).double()

    def load(m, path):
        m.load_state_dict(torch.load(path, weights_only=True))
        m.double()
        return lrs[paths.index(path)]

    captum = TracInCP(model, torch.utils.data.TensorDataset(x[:120].double(), y[:120]), paths, load,
                      layers=list(layers), loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=40,
                      sample_wise_grads_per_batch=True)  # fmt: skip
    assert rel(ours_scores.values, captum.influence((xq.double(), yq))) < REL
    assert rel(ours_self.values, captum.self_influence()) < REL


def test_exact_and_cg_training_vectors_on_the_layer_path_equal_torch_func(digits):
    torch.manual_seed(0)
    net = SmallCNN(width=4).eval()
    x, y = digits
    train = TrainingSet.from_tensors(x[:100], y[:100])
    xq, yq = x[120:124], y[120:124]
    for backend, options in ((ExactInfluence, {"curvature": "ggn"}), (CGInfluence, {"dtype": torch.float64})):
        for scope in ("last", ["features.9", "classifier"]):
            fast = backend(scope=scope, **options).fit(net, train)
            slow = backend(scope=scope, per_sample="torch.func", **options).fit(net, train)
            assert fast.per_sample_path == "layers"
            assert rel(fast.scores(xq, yq).values, slow.scores(xq, yq).values) < REL
            assert rel(fast.self_influence().values, slow.self_influence().values) < REL


def test_the_monitor_pass_is_one_forward_over_the_training_split():
    """The monitor's pass over the last layer runs the network once per batch (no backward) in eval mode and puts
    the module back in training mode."""
    from robustattr.callbacks import SelfInfluenceMonitor

    torch.manual_seed(0)
    net = SmallCNN(width=4)
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,))
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append((m.training, torch.is_grad_enabled())))

    class Module(nn.Module):
        dtype = torch.float32
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net(images)

    module = Module().train()
    norms = SelfInfluenceMonitor(batch_size=4)._squared_norms(module, torch.utils.data.TensorDataset(x, y),
                                                               torch.arange(10))  # fmt: skip
    assert module.training and len(norms) == 10
    # one probing forward of one image decides that the last layer gives the logits, then 3 batches of 4, 4, 2
    assert calls == [(False, False)] * 4
    reference = _func_gradients(copy.deepcopy(net).eval(), "last", x, y)
    assert rel(norms.double(), reference.pow(2).sum(1).double()) < 1e-5
