"""LoRA-MoE layers written by hand in other styles, for the detector: not the project's layer.

Each model routes ONCE (pre-gated: one top-2 router on the embedding) and passes the gates to
every layer as arguments; the layers differ only in how they write the expert sum.
"""
import torch
import torch.nn.functional as F
from torch import nn

D, N, R, K = 32, 4, 4, 2


class EinsumLoRA(nn.Module):
    """Stacked experts, gathered top-k factors, einsum."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(D, D)
        self.A = nn.Parameter(torch.randn(N, R, D) * 0.1)
        self.B = nn.Parameter(torch.randn(N, D, R) * 0.1)

    def forward(self, x, weights, experts):
        h = torch.einsum("td,tkrd->tkr", x, self.A[experts]) * weights[..., None]
        return self.base(x) + torch.einsum("tkr,tkor->to", h, self.B[experts])


class BmmLoRA(nn.Module):
    """Stacked experts stored transposed ([N, in, r], [N, r, out]), flattened gather, bmm."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(D, D)
        self.A = nn.Parameter(torch.randn(N, D, R) * 0.1)
        self.B = nn.Parameter(torch.randn(N, R, D) * 0.1)

    def forward(self, x, weights, experts):
        t = x.shape[0]
        flat = experts.reshape(-1)
        xs = x.repeat_interleave(K, dim=0)[:, None, :]  # [t*k, 1, D]
        h = torch.bmm(xs, self.A[flat])  # [t*k, 1, R]
        y = torch.bmm(h, self.B[flat]).reshape(t, K, D)
        return self.base(x) + (y * weights[..., None]).sum(1)


class LoopMaskLoRA(nn.Module):
    """Mixtral style: a loop over experts (nn.Linear pairs) weighted by masks of the top-k choice."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(D, D)
        self.down = nn.ModuleList(nn.Linear(D, R, bias=False) for _ in range(N))
        self.up = nn.ModuleList(nn.Linear(R, D, bias=False) for _ in range(N))
        for up in self.up:
            nn.init.normal_(up.weight, std=0.1)

    def forward(self, x, weights, experts):
        out = torch.zeros_like(x)
        for e in range(N):
            gate = (weights * (experts == e)).sum(-1, keepdim=True)  # 0 where e is not selected
            out = out + gate * self.up[e](self.down[e](x))
        return self.base(x) + out


class PreGatedHandModel(nn.Module):
    def __init__(self, layer_cls, layers=3):
        super().__init__()
        self.embed = nn.Embedding(64, D)
        self.router = nn.Linear(D, N, bias=False)
        self.layers = nn.ModuleList(layer_cls() for _ in range(layers))
        self.head = nn.Linear(D, 64)

    def forward(self, tokens):
        x = self.embed(tokens)
        top, experts = torch.topk(self.router(x), K, dim=-1)
        weights = torch.softmax(top, dim=-1)
        for layer in self.layers:
            x = x + torch.tanh(layer(x, weights, experts))
        return self.head(x)


STYLES = {"einsum": EinsumLoRA, "bmm": BmmLoRA, "loop_mask": LoopMaskLoRA}
