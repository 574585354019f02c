"""BERT's output blocks (dense, dropout, LayerNorm of the residual sum), or BART's whole encoder
layer (``--family bart``: attention, feed-forward, each with a functional dropout before its
residual add and a post-norm): torch, ``normfuse.patch``, ``normfuse.patch(...,
fuse_residual=True)`` and ``fuse_residual=True, fuse_dropout=True`` side by side.

The blocks of a BERT-base-sized layer (hidden 768: the self-output's 768 -> 768 dense and the
output's 3072 -> 768 one) built from transformers' own classes, on (tokens, features)
activations, in training mode (dropout 0.1: torch's draws in the first three, normfuse's masks
inside the kernel in the fourth) and in eval mode.
Forward, and forward+backward (``torch.autograd.grad`` over the block's input, its residual and
its parameters); the variants interleaved round by round, medians in ms, with the
LayerNorm of the residual sum alone (torch's ``F.layer_norm(x + r)`` against normfuse's
``add_layer_norm``) for scale: the dense layer's matmul is most of a block. It runs with glibc's
default malloc, as a user's process does (``bench_cpu.py`` sets tunables that keep freed memory
mapped; here each fresh activation may cost its page faults, in every variant alike).

    python benchmarks/postnorm_blocks_cpu.py [--family bert|bart] [--tokens 4096] [--rounds 15] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import normfuse
from normfuse.cli.bench import interleaved_medians


def _blocks(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

    config = BertConfig(hidden_size=768, intermediate_size=3072, hidden_dropout_prob=0.1)
    return {"self-output 768": BertSelfOutput(config).to(dtype), "output 3072": BertOutput(config).to(dtype)}


def _bart_layer(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from transformers import BartConfig
    from transformers.models.bart.modeling_bart import BartEncoderLayer

    config = BartConfig(d_model=768, encoder_ffn_dim=3072, encoder_attention_heads=12, dropout=0.1)
    return {"encoder layer 768": BartEncoderLayer(config).to(dtype)}


def _median_ms(fns: dict[str, object], rounds: int) -> dict[str, float]:
    return {name: seconds * 1e3 for name, seconds in interleaved_medians(fns, rounds, 1).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="bert", choices=["bert", "bart"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, {args.dtype}; ms, medians of {args.rounds}")
    print(
        f"{'block':16s} {'mode':5s} {'pass':4s} {'torch':>8s} {'patch':>8s} {'fused':>8s} {'+dropout':>8s}"
        "  fused/torch fused/patch +dropout/torch"
    )
    for name, block in (_blocks(dtype) if args.family == "bert" else _bart_layer(dtype)).items():
        variants = {k: copy.deepcopy(block) for k in ("patch", "fused", "+dropout")}
        variants = {"torch": block, **variants}
        normfuse.patch(variants["patch"])
        report = normfuse.patch(variants["fused"], fuse_residual=True)
        assert any(e.fused_adds and "dropout" not in e.formula for e in report.patched), str(report)
        report = normfuse.patch(variants["+dropout"], fuse_residual=True, fuse_dropout=True)
        assert any(e.formula.startswith("fused dropout") for e in report.patched), str(report)
        if args.family == "bert":
            x = torch.randn(args.tokens, block.dense.in_features, dtype=dtype, requires_grad=True)
            r = torch.randn(args.tokens, 768, dtype=dtype, requires_grad=True)
            inputs = (x, r)
        else:  # sequences of 512 tokens, no mask
            x = torch.randn(args.tokens // 512, 512, 768, dtype=dtype, requires_grad=True)
            inputs = (x, None)
        for training in (True, False):
            for module in variants.values():
                module.train(training)

            def forward(module=None):
                with torch.no_grad():
                    return module(*inputs)

            def both(module=None):
                out = module(*inputs)
                leaves = [t for t in inputs if t is not None]
                return torch.autograd.grad(out.float().square().sum(), [*leaves, *module.parameters()])

            for label, fn in (("fwd", forward), ("f+b", both)):
                ms = _median_ms({k: (lambda m=m, fn=fn: fn(m)) for k, m in variants.items()}, args.rounds)
                print(
                    f"{name:16s} {'train' if training else 'eval':5s} {label:4s} {ms['torch']:8.2f} {ms['patch']:8.2f} "
                    f"{ms['fused']:8.2f} {ms['+dropout']:8.2f}  {ms['fused'] / ms['torch']:11.2f} "
                    f"{ms['fused'] / ms['patch']:11.2f} {ms['+dropout'] / ms['torch']:14.2f}"
                )
    # the dropout, the add and the norm alone, for scale (training mode)
    h, res = torch.randn(args.tokens, 768, dtype=dtype), torch.randn(args.tokens, 768, dtype=dtype)
    w, b = torch.randn(768, dtype=dtype), torch.randn(768, dtype=dtype)
    with torch.no_grad():
        ms = _median_ms(
            {
                "torch": lambda: F.layer_norm(F.dropout(h, 0.1) + res, (768,), w, b),
                "patch": lambda: normfuse.layer_norm(F.dropout(h, 0.1) + res, (768,), w, b),
                "fused": lambda: normfuse.add_layer_norm(F.dropout(h, 0.1), res, (768,), w, b),
                "+dropout": lambda: normfuse.add_layer_norm(h, res, (768,), w, b, dropout_p=0.1),
            },
            args.rounds * 2,
        )
    print(
        f"{'drop+add+norm':16s} {'train':5s} {'fwd':4s} {ms['torch']:8.2f} {ms['patch']:8.2f} {ms['fused']:8.2f} "
        f"{ms['+dropout']:8.2f}  {ms['fused'] / ms['torch']:11.2f} {ms['fused'] / ms['patch']:11.2f} "
        f"{ms['+dropout'] / ms['torch']:14.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
