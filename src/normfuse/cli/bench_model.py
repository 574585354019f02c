"""``normfuse bench --model llama|gpt2|bert|bart``: the training step of a real model, patched vs not.

A small Llama-shaped model (RMSNorm), GPT-2-shaped model (LayerNorm), BERT-shaped masked-LM
(post-norm LayerNorms, dropout 0.1) or BART-shaped sequence-to-sequence model (post-norm
LayerNorms, dropout 0.1 before each residual add) from Hugging Face transformers, built from a
config (no download). ``--fuse`` patches with ``fuse_residual=True`` (and, for BERT and BART,
``fuse_dropout=True``: the dropout before each fused add goes into the add and norm kernel); the
norms' share of a step is
then not measured (the fused norms are no module calls to time apart). One training step is forward, backward and an
AdamW update on random tokens. The unpatched model and a ``normfuse.patch``-ed copy (same
weights) alternate step by step and the medians are compared. The norms' share of a step is
measured by capturing every norm's input during a step and timing the norms alone, forward and
backward, on exactly those inputs (torch's RMSNorm backward is a chain of generic elementwise
ops that a profiler cannot attribute to the norm). Memory: the bytes autograd keeps for the
backward (saved activations), counted by storage, and the process's peak resident size.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch


def build(kind: str, width: int, layers: int, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    vocab = 4096
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64 or width, num_hidden_layers=layers,
            num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 128), vocab_size=vocab,
            max_position_embeddings=4096,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    elif kind == "bert":
        config = transformers.BertConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
            num_attention_heads=max(1, width // 64), vocab_size=vocab, max_position_embeddings=4096,
        )  # fmt: skip
        model = transformers.BertForMaskedLM(config)
    elif kind == "bart":
        config = transformers.BartConfig(
            d_model=width, encoder_ffn_dim=4 * width, decoder_ffn_dim=4 * width, encoder_layers=layers,
            decoder_layers=layers, encoder_attention_heads=max(1, width // 64),
            decoder_attention_heads=max(1, width // 64), vocab_size=vocab, max_position_embeddings=4096,
        )  # fmt: skip
        model = transformers.BartForConditionalGeneration(config)
    else:
        config = transformers.GPT2Config(
            n_embd=width, n_layer=layers, n_head=max(1, width // 64), vocab_size=vocab, n_positions=4096,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype).train()


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "norm" in type(m).__name__.lower()]


def _step_fn(model, ids):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _norm_time(model, ids, reps: int) -> float:
    """Seconds per step spent in the norms: their forward and backward on the inputs they saw."""
    captured: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append((mod, inp[0].detach()))) for m in _norms(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    cases = [(mod, x.clone().requires_grad_(), torch.randn_like(x)) for mod, x in captured]

    def run():
        for mod, x, dy in cases:
            out = mod(x)
            torch.autograd.grad(out, [x, *mod.parameters()], dy.to(out.dtype))

    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_model_bench(
    kind: str, width: int, layers: int, seq: int, batch: int, reps: int, dtype: torch.dtype, console, fuse: bool = False
) -> dict:
    import resource

    import normfuse

    torch.manual_seed(0)
    plain = build(kind, width, layers, dtype)
    patched = copy.deepcopy(plain)
    report = normfuse.patch(patched, fuse_residual=fuse, fuse_dropout=fuse and kind in ("bert", "bart"))
    ids = torch.randint(0, plain.config.vocab_size, (batch, seq))
    steps = {"torch": _step_fn(plain, ids), "normfuse": _step_fn(patched, ids)}
    for fn in steps.values():  # warm-up: JIT compile, allocator
        fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    step = {name: statistics.median(v) for name, v in samples.items()}
    norm = None if fuse else {"torch": _norm_time(plain, ids, reps), "normfuse": _norm_time(patched, ids, reps)}
    saved = {"torch": _saved_bytes(plain, ids), "normfuse": _saved_bytes(patched, ids)}
    return {
        "model": kind, "dtype": str(dtype).removeprefix("torch."), "width": width, "layers": layers, "seq": seq,
        "batch": batch, "norms": len(report.patched), "fused": fuse, "step_s": step, "norm_s": norm,
        "norm_share": {k: norm[k] / step[k] for k in step} if norm else None, "saved_bytes": saved,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
