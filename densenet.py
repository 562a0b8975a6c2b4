"""
DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks",
https://arxiv.org/abs/1608.06993), written out as our own small, readable module.

The structure deliberately mirrors torchvision.models.densenet: every
parameter and buffer has the same name and shape (features.conv0.weight,
features.denseblock1.denselayer1.norm1.running_mean, classifier.bias, ...),
and the forward pass does the same math in the same order. That means
torchvision's DenseNet checkpoints load into these models with strict=True
and produce the same outputs, and our checkpoints load back into torchvision.
Very old checkpoints (torchvision's published .pth files) spell the per-layer
modules "norm.1", "conv.2", ...; load_state_dict() renames those on the fly.

The architecture follows torchvision's implementation, which is licensed
under BSD-3-Clause (Copyright (c) Soumith Chintala 2016, all rights reserved).
"""

import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

# -----------------------------------------------------------------------------
# legacy checkpoint keys

# Module names used to be allowed to contain '.', and the original _DenseLayer
# registered its submodules as 'norm.1', 'relu.1', 'conv.1', 'norm.2', ... so
# old checkpoints contain keys like 'features.denseblock1.denselayer1.norm.1.weight'.
# Today the same tensor lives at '...denselayer1.norm1.weight'. Group 1 is
# everything up to the dropped dot, group 2 is the rest, so the new key is g1 + g2.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
# same rename for the module prefixes in state_dict._metadata (module versions)
_LEGACY_PREFIX = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])$")


def convert_legacy_keys(state_dict):
    """Return a new OrderedDict with legacy 'norm.1'-style keys renamed to
    the modern 'norm1' spelling; all other keys (and key order) are untouched.
    The input dict is not modified."""
    out = OrderedDict()
    for key, value in state_dict.items():
        m = _LEGACY_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    # nn.Module.load_state_dict reads per-module version info from _metadata
    # (e.g. BatchNorm uses it to decide whether num_batches_tracked may be
    # missing), so carry it over, renamed the same way.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        new_metadata = OrderedDict()
        for prefix, value in metadata.items():
            m = _LEGACY_PREFIX.match(prefix)
            new_metadata[m.group(1) + m.group(2) if m else prefix] = value
        out._metadata = new_metadata
    return out

# -----------------------------------------------------------------------------
# building blocks


class _DenseLayer(nn.Module):
    """One BN-ReLU-Conv1x1 (bottleneck) -> BN-ReLU-Conv3x3 layer. It sees the
    concatenation of all earlier feature maps in its block and emits only
    growth_rate new channels; the block does the bookkeeping of the list."""

    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate, memory_efficient=False):
        super().__init__()
        # the 1x1 bottleneck squeezes the ever-growing input down to
        # bn_size * growth_rate channels so the 3x3 conv stays cheap
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs, update_stats=True):
        # torch.cat allocates a fresh (sum of channels) tensor per layer; together
        # with norm1's output this is what makes naive DenseNet memory quadratic
        # in depth. inplace relu1 is safe: it only overwrites norm1's output.
        concated_features = torch.cat(inputs, 1)
        norm = self.norm1
        if not update_stats and norm.training and norm.track_running_stats:
            # checkpoint recompute during backward: normalize with the batch's
            # own statistics exactly as the first pass did, but leave
            # running_mean / running_var / num_batches_tracked alone, otherwise
            # every training step would count twice in the running averages.
            # The stats go in as throwaway copies (not None) so the op saves the
            # same tensors as the first pass, which non-reentrant checkpoint checks.
            normed = F.batch_norm(
                concated_features, norm.running_mean.clone(), norm.running_var.clone(),
                norm.weight, norm.bias, training=True, momentum=0.0, eps=norm.eps,
            )
        else:
            normed = norm(concated_features)
        return self.conv1(self.relu1(normed))

    def forward(self, input):
        # accept a single tensor too, so a layer can be used on its own
        prev_features = [input] if isinstance(input, torch.Tensor) else list(input)

        # Checkpointing only pays off (and only makes sense) when autograd would
        # otherwise keep the concat + norm1 activations alive for backward. Under
        # no_grad / eval inference we run the plain path, which is also faster.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in prev_features)
        if self.memory_efficient and needs_grad:
            # recompute concat+norm1+relu1+conv1 during backward instead of storing
            # them ("Memory-Efficient Implementation of DenseNets", arXiv:1707.06990).
            # Non-reentrant checkpoint also copes with inputs that don't need grad.
            # The closure remembers whether it already ran once, so the recompute
            # doesn't update BN running stats a second time (torchvision's version
            # does; ours keeps them identical to memory_efficient=False).
            first_call = [True]

            def closure(*inputs):
                update_stats = first_call[0]
                first_call[0] = False
                return self.bn_function(inputs, update_stats=update_stats)

            bottleneck_output = cp.checkpoint(closure, *prev_features, use_reentrant=False)
        else:
            bottleneck_output = self.bn_function(prev_features)

        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """num_layers dense layers; layer i sees the block input plus the outputs
    of layers 0..i-1, and the block returns all of them concatenated.
    A ModuleDict (not Sequential) because the layers aren't simply chained."""

    _version = 2  # same as torchvision, so the state_dict metadata matches too

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate, memory_efficient=False):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features):
        # keep a list and concat lazily inside each layer rather than growing one
        # tensor, so each layer's output is computed once and shared
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """Between dense blocks: BN-ReLU-Conv1x1 halves the channels (compression
    0.5, the "C" in DenseNet-BC) and a 2x2 average pool halves the resolution."""

    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

# -----------------------------------------------------------------------------
# the full model


class DenseNet(nn.Module):
    """DenseNet-BC.

    growth_rate: channels each dense layer adds (k in the paper)
    block_config: number of layers in each dense block
    num_init_features: channels of the stem convolution
    bn_size: bottleneck width multiplier (bottleneck has bn_size * k channels)
    drop_rate: dropout after each dense layer (only active in train mode)
    num_classes: size of the classifier output
    memory_efficient: checkpoint the bottlenecks; less memory, ~extra compute
    """

    def __init__(
        self,
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        bn_size=4,
        drop_rate=0.0,
        num_classes=1000,
        memory_efficient=False,
    ):
        super().__init__()

        # stem: 7x7/2 conv + 3x3/2 max pool, i.e. 224 -> 56 before the first block
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )

        # dense blocks, with a transition after every block except the last.
        # Everything lives inside self.features (not separate attributes) purely
        # so that the state_dict keys match torchvision's.
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features //= 2

        # the layers are pre-activation (BN-ReLU-Conv), so the last block's output
        # has not been normalized yet; norm5 does that, forward() applies the ReLU
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        self.classifier = nn.Linear(num_features, num_classes)

        # torchvision's init: He-normal convs (fan_in, suits ReLU), BN as identity,
        # zero linear bias. The linear weight keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        features = self.features(x)
        # inplace is fine: `features` is norm5's output and not needed elsewhere
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        # flatten, not .view: pooled channels_last tensors are not view-compatible
        out = torch.flatten(out, 1)
        return self.classifier(out)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # accept both the modern and the legacy ('norm.1') key spelling
        return super().load_state_dict(convert_legacy_keys(state_dict), strict=strict, assign=assign)

# -----------------------------------------------------------------------------
# standard configurations (same hyperparameters as torchvision / the paper)


def densenet121(**kwargs):
    """DenseNet-121: k=32, blocks (6, 12, 24, 16), 64 stem channels (~8.0M params)."""
    return DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, **kwargs)


def densenet161(**kwargs):
    """DenseNet-161: k=48, blocks (6, 12, 36, 24), 96 stem channels (~28.7M params)."""
    return DenseNet(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, **kwargs)


def densenet169(**kwargs):
    """DenseNet-169: k=32, blocks (6, 12, 32, 32), 64 stem channels (~14.1M params)."""
    return DenseNet(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64, **kwargs)


def densenet201(**kwargs):
    """DenseNet-201: k=32, blocks (6, 12, 48, 32), 64 stem channels (~20.0M params)."""
    return DenseNet(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64, **kwargs)


MODELS = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
}


def build_model(name, **kwargs):
    """Build a model by name, e.g. build_model('densenet201', num_classes=1000)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
