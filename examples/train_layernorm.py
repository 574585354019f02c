"""Train a small model whose LayerNorms are normfuse.LayerNorm, and watch gamma and beta learn.

    python examples/train_layernorm.py [--steps 300] [--seed 0]

The data are generated here: inputs with a different offset and scale per feature, labels
from a fixed random "teacher" network. Each LayerNorm starts at gamma = 1, beta = 0; after
training the script prints the loss curve and how far each gamma and beta moved.
"""

from __future__ import annotations

import argparse
import time

import torch

import normfuse


def make_data(n: int, features: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offset = 3 * torch.randn(features, generator=gen)
    scale = torch.exp(torch.randn(features, generator=gen))
    x = offset + scale * torch.randn(n, features, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.Tanh(), torch.nn.Linear(64, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        y = teacher((x - offset) / scale).argmax(dim=1)
    return x, y


class Model(torch.nn.Module):
    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.inp = torch.nn.Linear(features, hidden)
        self.norm1 = normfuse.LayerNorm(hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.norm2 = normfuse.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.norm1(self.inp(x)))
        h = h + torch.nn.functional.gelu(self.norm2(self.mid(h)))
        return self.out(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    features, hidden, classes = 32, 256, 8
    x, y = make_data(20480, features, classes, gen)
    x_train, y_train, x_test, y_test = x[:16384], y[:16384], x[16384:], y[16384:]
    model = Model(features, hidden, classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, normfuse.LayerNorm)}

    print(f"normfuse {normfuse.__version__}: training a {hidden}-wide MLP with {len(norms)} normfuse.LayerNorm")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (512,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained {args.steps} steps in {elapsed:.1f} s; held-out accuracy {accuracy:.1%} (chance {1 / classes:.1%})")

    print("\nwhat the LayerNorms learned (they started at gamma = 1, beta = 0):")
    for name, m in norms.items():
        dgamma = (m.weight.detach() - 1).abs()
        dbeta = m.bias.detach().abs()
        top = torch.topk(dgamma, 3).indices.tolist()
        print(
            f"  {name}: |gamma - 1| mean {dgamma.mean():.3f} max {dgamma.max():.3f};"
            f" |beta| mean {dbeta.mean():.3f} max {dbeta.max():.3f};"
            f" gamma range [{m.weight.min():.2f}, {m.weight.max():.2f}]; most changed gamma features {top}"
        )


if __name__ == "__main__":
    main()
