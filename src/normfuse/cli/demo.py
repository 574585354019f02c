"""``normfuse demo``: train a small character GPT twice (normfuse, then torch LayerNorm) and show
what the LayerNorms' gamma and beta learned.

The model: token and position embeddings, pre-norm transformer blocks (LayerNorm before
attention and before the MLP), a final LayerNorm, a linear head. The text: the Book of Genesis
(King James Version, public domain), bundled with the package.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

import normfuse
from normfuse.cli import positive_int, say_if_overwriting


def load_text() -> str:
    return resources.files("normfuse.cli").joinpath("data/genesis_kjv.txt").read_text(encoding="utf-8")


@dataclass
class Config:
    vocab: int
    context: int = 64
    width: int = 128
    layers: int = 3
    heads: int = 4


class Block(torch.nn.Module):
    def __init__(self, cfg: Config, norm_cls: type[torch.nn.Module]):
        super().__init__()
        self.norm_attn = norm_cls(cfg.width)
        self.qkv = torch.nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = torch.nn.Linear(cfg.width, cfg.width)
        self.norm_mlp = norm_cls(cfg.width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(cfg.width, 4 * cfg.width), torch.nn.GELU(), torch.nn.Linear(4 * cfg.width, cfg.width)
        )
        self.heads = cfg.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm_mlp(x))


class CharGPT(torch.nn.Module):
    def __init__(self, cfg: Config, norm_cls: type[torch.nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.tok = torch.nn.Embedding(cfg.vocab, cfg.width)
        self.pos = torch.nn.Embedding(cfg.context, cfg.width)
        self.blocks = torch.nn.ModuleList(Block(cfg, norm_cls) for _ in range(cfg.layers))
        self.norm_final = norm_cls(cfg.width)
        self.head = torch.nn.Linear(cfg.width, cfg.vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_final(x))

    @torch.no_grad()
    def sample(self, start: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
        idx = start
        for _ in range(length):
            logits = self(idx[:, -self.cfg.context :])[:, -1]
            probs = torch.softmax(logits.float() / 0.8, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs.cpu(), 1, generator=gen).to(idx.device)], dim=1)
        return idx


def norm_layers(model: torch.nn.Module) -> dict[str, torch.nn.LayerNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}


def snapshot(model: torch.nn.Module) -> dict[str, dict[str, list[float]]]:
    return {
        name: {"gamma": m.weight.detach().float().cpu().tolist(), "beta": m.bias.detach().float().cpu().tolist()}
        for name, m in norm_layers(model).items()
    }


def train(args, norm_cls, data: torch.Tensor, vocab: int, progress, label: str) -> dict:
    """One training run from ``args.seed``; returns losses, timing, snapshots and the model."""
    torch.manual_seed(args.seed)
    cfg = Config(vocab=vocab, context=args.context, width=args.width, layers=args.layers)
    model = CharGPT(cfg, norm_cls).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    snapshots = {"start": snapshot(model)}
    losses = []
    task = progress.add_task(label, total=args.steps)
    # the first steps pay one-time costs (JIT, allocator warm-up): tokens/s counts the rest
    warmup = min(3, args.steps - 1)
    tokens = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if step == warmup + 1:
            tokens = 0
            start = time.perf_counter()
        offsets = torch.randint(0, len(data) - cfg.context - 1, (args.batch,), generator=gen)
        window = torch.stack([data[o : o + cfg.context + 1] for o in offsets.tolist()]).to(args.device)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += window[:, 1:].numel()
        if step == math.ceil(args.steps / 2):
            snapshots["middle"] = snapshot(model)
        progress.update(task, advance=1, description=f"{label} loss {losses[-1]:.3f}")
    elapsed = time.perf_counter() - start
    snapshots["end"] = snapshot(model)
    return {"model": model, "losses": losses, "tokens_per_s": tokens / elapsed, "seconds": elapsed, "snapshots": snapshots}


def plot(out: Path, runs: dict[str, dict], console) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    loss_png = out / "loss.png"
    say_if_overwriting(loss_png, console)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in runs.items():
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], label=label, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats/char)")
    ax.set_title("Same seed, same model: normfuse.LayerNorm vs torch.nn.LayerNorm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    written.append(loss_png)

    snaps = runs["normfuse"]["snapshots"]
    layers = list(snaps["end"])
    gb_png = out / "gamma_beta.png"
    say_if_overwriting(gb_png, console)
    fig, axes = plt.subplots(len(layers), 2, figsize=(9, 1.9 * len(layers)), squeeze=False)
    for row, name in enumerate(layers):
        for col, (param, initial) in enumerate((("gamma", 1.0), ("beta", 0.0))):
            ax = axes[row][col]
            # every parameter starts at the same value: a line, not a bar that dwarfs the rest
            ax.axvline(initial, color="grey", linestyle="--", label="start")
            values = [v for moment in ("middle", "end") if moment in snaps for v in snaps[moment][name][param]]
            low, high = min(values + [initial]), max(values + [initial])
            bins = torch.linspace(low, high + 1e-6, 41).tolist()
            for moment, color in (("middle", "tab:blue"), ("end", "tab:red")):
                if moment in snaps:
                    ax.hist(snaps[moment][name][param], bins=bins, alpha=0.55, color=color, label=moment)
            ax.set_title(f"{name} {param}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("LayerNorm gamma and beta across training (normfuse run)")
    fig.tight_layout()
    fig.savefig(gb_png, dpi=110)
    plt.close(fig)
    written.append(gb_png)
    return written


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    console = Console()
    text = load_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    console.print(
        f"normfuse {normfuse.__version__} demo: character GPT, {args.layers} pre-norm blocks of width {args.width}, "
        f"{len(text):,} characters of Genesis (KJV), {args.steps} steps, device {args.device}, seed {args.seed}"
    )
    runs = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        runs["normfuse"] = train(args, normfuse.LayerNorm, data, len(chars), progress, "normfuse.LayerNorm")
        runs["torch"] = train(args, torch.nn.LayerNorm, data, len(chars), progress, "torch.nn.LayerNorm")

    a, b = runs["normfuse"]["losses"], runs["torch"]["losses"]
    max_gap = max(abs(x - y) for x, y in zip(a, b))
    table = Table(title="training loss, side by side")
    for column in ("step", "normfuse", "torch", "difference"):
        table.add_column(column, justify="right")
    shown = sorted({1, *range(max(1, args.steps // 8), args.steps + 1, max(1, args.steps // 8)), args.steps})
    for step in shown:
        table.add_row(str(step), f"{a[step - 1]:.4f}", f"{b[step - 1]:.4f}", f"{a[step - 1] - b[step - 1]:+.1e}")
    console.print(table)
    console.print(
        f"largest loss difference over all steps: {max_gap:.2e} (the same function: rounding differences, compounded by training)\n"
        f"tokens/s: normfuse {runs['normfuse']['tokens_per_s']:,.0f}, torch {runs['torch']['tokens_per_s']:,.0f}"
    )

    gen = torch.Generator().manual_seed(args.seed)
    start = torch.tensor([[index[c] for c in "And God said"]], device=args.device)
    sample = runs["normfuse"]["model"].sample(start, args.sample_chars, gen)[0].tolist()
    console.print("[bold]sample from the normfuse model:[/bold]")
    console.print("".join(chars[i] for i in sample), markup=False, highlight=False)

    learned = Table(title="what each LayerNorm learned (started at gamma = 1, beta = 0)")
    for column in ("layer", "|γ-1| mean", "γ std", "|β| mean", "β std", "most moved γ"):
        learned.add_column(column, justify="right", overflow="fold")
    stats = {}
    for name, end in runs["normfuse"]["snapshots"]["end"].items():
        gamma = torch.tensor(end["gamma"])
        beta = torch.tensor(end["beta"])
        moved = (gamma - 1).abs()
        top = torch.topk(moved, 3).indices.tolist()
        stats[name] = {
            "gamma_moved_mean": moved.mean().item(),
            "gamma_std": gamma.std().item(),
            "beta_moved_mean": beta.abs().mean().item(),
            "beta_std": beta.std().item(),
            "most_changed_gamma": top,
        }
        learned.add_row(
            name, f"{moved.mean():.3f}", f"{gamma.std():.3f}", f"{beta.abs().mean():.3f}", f"{beta.std():.3f}",
            " ".join(f"#{i}" for i in top),
        )  # fmt: skip
    console.print(learned)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = plot(out, runs, console)
    summary = out / "demo.json"
    say_if_overwriting(summary, console)
    summary.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "seed": args.seed,
                "losses": {k: v["losses"] for k, v in runs.items()},
                "tokens_per_s": {k: v["tokens_per_s"] for k, v in runs.items()},
                "max_loss_difference": max_gap,
                "learned": stats,
                "sample": "".join(chars[i] for i in sample),
            },
            indent=1,
        )
    )
    written.append(summary)
    console.print("[green]done.[/green] wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a character GPT with normfuse.LayerNorm and show gamma/beta learning",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=400, help="training steps per run (default 400: about a minute for both runs on 2 cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    p.add_argument("--out", default="normfuse-demo", help="directory for the plots and demo.json (default ./normfuse-demo)")
    p.add_argument("--batch", type=positive_int, default=16, help="sequences per step (default 16)")
    p.add_argument("--context", type=positive_int, default=64, help="characters per sequence (default 64)")
    p.add_argument("--width", type=positive_int, default=128, help="model width (default 128)")
    p.add_argument("--layers", type=positive_int, default=3, help="transformer blocks (default 3)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--sample-chars", type=positive_int, default=200, help="length of the generated sample (default 200)")
    p.set_defaults(run=run)
