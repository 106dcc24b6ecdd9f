"""Hand-written models for the tests: each has a known feature map the test can compute itself."""

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalPoolNet(nn.Module):
    """Pools with F.adaptive_avg_pool2d inside forward: no pooling module to find."""

    def __init__(self, n_out=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, n_out)

    def features(self, x):
        return F.relu(self.stage(self.stem(x)))

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NHWCBlockNet(nn.Module):
    """Channels-last blocks with LayerNorm and Linear, pooled by a mean over (1, 2)."""

    def __init__(self, n_out=10):
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.norm = nn.LayerNorm(12)
        self.mlp = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
        self.fc = nn.Linear(12, n_out)

    def features(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(x))  # (B, H, W, C)

    def forward(self, x):
        return self.fc(self.features(x).mean((1, 2)))


class TinyViT(nn.Module):
    """A ViT with a class token; the head reads the class token after a final norm."""

    def __init__(self, img=32, patch=8, dim=16, n_out=10):
        super().__init__()
        self.grid = img // patch
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid**2, dim) * 0.02)
        self.block = nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def features(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.norm(self.block(x))  # (B, 1 + h*w, C)

    def forward(self, x):
        return self.head(self.features(x)[:, 0])


class DataDependentNet(nn.Module):
    """Control flow on tensor values: fx cannot trace it, module hooks must."""

    def __init__(self, n_out=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.scale = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, n_out)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:  # data-dependent
            x = x * 2
        return self.fc(self.pool(x).flatten(1))


class GuardedPoolNet(DataDependentNet):
    """Data-dependent, and its pooling guarded by ``except Exception`` (a fallback path)."""

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = x * 2
        try:
            pooled = self.pool(x)
        except Exception:
            pooled = x.mean((2, 3), keepdim=True)
        return self.fc(pooled.flatten(1))


class TrainBranchNet(nn.Module):
    """A body whose forward differs in training: the body must follow .train()/.eval()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x * 2
        return self.fc(x.mean((2, 3)))


class ConstantsNet(nn.Module):
    """A forward that makes tensors (fx stores them as ``_tensor_constantN``), different ones in
    training: autocut must not leave them on the model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        if self.training:
            x = x * torch.tensor([2.0])
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    """No spatial map anywhere: there is nothing to cut."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)
