"""normfuse.patch on tiny Hugging Face and torch models built from configs (no downloads)."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import normfuse
from tests._helpers import norm_err, skip_where_older_torch_differs

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install normfuse[hf])")
# The models' expected counts are those of transformers 5 (5.25 in CI); 4.45, 4.53 and 4.57 give
# them too. A class that some transformers 4 writes otherwise than any known formula or layer
# form would be left alone and reported: the tests that expect it patched then skip, saying so.
OLDER_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5


def _skip_where_transformers_4_is_left_alone(left_alone: bool, what: str) -> None:
    if left_alone and OLDER_TRANSFORMERS:
        pytest.skip(f"transformers {transformers.__version__} writes {what} otherwise than transformers 5: left alone")

VOCAB = 97
DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64,
)  # fmt: skip


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER))


def _gemma():
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**DECODER, head_dim=16))


def _hf(model_class: str, config_class: str, **config):
    """A tiny model of a family this transformers may not have yet (skipped where it has not)."""
    if not hasattr(transformers, model_class):
        pytest.skip(f"this transformers has no {model_class}")
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


def _gemma4():
    # Gemma 4's norms (with_scale, also weightless ones) in every block, beside its q/k/v norms
    return _hf("Gemma4ForCausalLM", "Gemma4TextConfig", **DECODER, head_dim=16)


def _olmo():
    # OLMo (1): LayerNorms without weight or bias, in float32
    return _hf("OlmoForCausalLM", "OlmoConfig", **DECODER)


def _llama4():
    # Llama 4's text model: the Llama formula, and weightless norms on queries and keys
    return _hf("Llama4ForCausalLM", "Llama4TextConfig", **DECODER, head_dim=16, intermediate_size_mlp=128,
               num_local_experts=2)  # fmt: skip


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    )


def _bert():
    return transformers.BertForMaskedLM(
        transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=VOCAB)  # fmt: skip
    )


def _deberta():
    # DeBERTa (1)'s own LayerNorm (x-hat rounded to the input dtype before the affine), beside torch's
    return transformers.DebertaForMaskedLM(
        transformers.DebertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=VOCAB)  # fmt: skip
    )


def _squeezebert():
    # SqueezeBERT's LayerNorm over the channels of (batch, channels, length): torch's LayerNorm
    # called by name through a permute, which no subclass below it would reach
    return transformers.SqueezeBertForMaskedLM(
        transformers.SqueezeBertConfig(hidden_size=64, embedding_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, vocab_size=VOCAB)  # fmt: skip
    )


def _t5():
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB)
    )


class _Encoder(torch.nn.Module):
    """A norm_first torch.nn.TransformerEncoder with an nn.RMSNorm final norm."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 64)
        layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.RMSNorm(64), enable_nested_tensor=False)
        self.head = torch.nn.Linear(64, VOCAB)

    def forward(self, input_ids, **_):
        return self.head(self.encoder(self.embed(input_ids)))


MODELS = {
    "llama": _llama, "qwen2": _qwen2, "gemma": _gemma, "gemma4": _gemma4, "llama4": _llama4, "olmo": _olmo, "gpt2": _gpt2,
    "bert": _bert, "deberta": _deberta, "squeezebert": _squeezebert, "t5": _t5, "torch": _Encoder,
}  # fmt: skip
EXPECTED = {
    "llama": {"llama": 5}, "qwen2": {"llama": 5}, "gemma": {"gemma": 5}, "gemma4": {"gemma4": 18},
    "llama4": {"llama": 5, "weightless": 2}, "olmo": {"olmo": 5}, "gpt2": {"torch LayerNorm": 5},
    "bert": {"torch LayerNorm": 6}, "deberta": {"deberta": 5, "torch LayerNorm": 1},
    "squeezebert": {"torch LayerNorm": 2, "squeezebert": 4}, "t5": {"t5": 12},
    "torch": {"torch LayerNorm": 4, "torch RMSNorm": 1},
}  # fmt: skip
# norm-named modules a model's report leaves alone, by class: SqueezeBERT's ConvDropoutLayerNorm
# is a convolution, dropout and residual add around its (patched) SqueezeBertLayerNorm
EXPECTED_LEFT = {"squeezebert": {"ConvDropoutLayerNorm": 4}}


def _build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).train()
    with torch.no_grad():  # non-trivial norm weights (and biases), so a wrong formula shows
        for pname, param in model.named_parameters():
            if "norm" in pname.lower() or "ln_" in pname or "LayerNorm" in pname:
                param.normal_(0.3 if name == "gemma" else 1.0, 0.2) if param.dim() == 1 and "bias" not in pname else param.normal_(0, 0.2)
    return model


def _inputs(name):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :7]}
    return {"input_ids": ids}


def _logits(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_gives_the_same_logits_and_gradients(name, dtype):
    model = _build(name, dtype).eval()  # eval: no dropout (some of it is functional), gradients still flow
    reference = copy.deepcopy(model)
    report = normfuse.patch(model)
    counts: dict[str, int] = {}
    for entry in report.patched:
        counts[entry.formula] = counts.get(entry.formula, 0) + 1
    _skip_where_transformers_4_is_left_alone(counts != EXPECTED[name], f"{name}'s norms ({report})")
    assert counts == EXPECTED[name], str(report)
    left: dict[str, int] = {}
    for entry in report.skipped:
        left[entry.class_name] = left.get(entry.class_name, 0) + 1
    assert left == EXPECTED_LEFT.get(name, {}), str(report)
    assert all("it holds submodules" in entry.reason for entry in report.skipped)
    inputs = _inputs(name)
    logits, ref_logits = _logits(model, inputs), _logits(reference, inputs)
    assert logits.dtype == ref_logits.dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: norms round within an ulp, which propagates
    assert norm_err(logits.detach(), ref_logits.detach()) <= tol
    grads = torch.autograd.grad(logits.float().square().mean(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(ref_logits.float().square().mean(), list(reference.parameters()), allow_unused=True)
    for (pname, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (rg is None), pname
        if g is None:
            continue
        if rg.float().norm() < 1e-8:  # zero in exact arithmetic (attention key biases): rounding noise
            assert g.float().norm() < 1e-6, pname
        else:
            assert norm_err(g, rg) <= (1e-4 if dtype == torch.float32 else 6e-2), pname


@pytest.mark.parametrize("name", ["llama", "gemma", "t5", "gpt2", "torch"])
def test_normfuse_runs_and_the_original_norm_code_does_not(name, monkeypatch):
    model = _build(name)
    report = normfuse.patch(model)
    originals = {type(m)._normfuse_original_class for m in model.modules() if hasattr(type(m), "_normfuse_original_class")}
    for cls in originals:
        if cls.__module__.startswith("transformers"):
            monkeypatch.setattr(cls, "forward", lambda *a, **k: pytest.fail("the original norm forward ran"))
    # torch's LayerNorm and RMSNorm modules compute through these
    for fn in ("layer_norm", "rms_norm"):
        monkeypatch.setattr(torch.nn.functional, fn, lambda *a, **k: pytest.fail(f"torch's {fn} ran"))
    with torch.profiler.profile() as prof:
        _logits(model, _inputs(name)).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert "NormFunction" in names and "NormFunctionBackward" in names
    assert len(report.patched) > 0


def test_parameters_state_dict_and_names_are_unchanged():
    model = _build("llama")
    before = {name: param for name, param in model.named_parameters()}
    keys = list(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters())
    normfuse.patch(model)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    assert model.model.norm.variance_epsilon == 1e-6 and isinstance(model.model.norm, type(model.model.layers[0].input_layernorm).__mro__[1])
    _logits(model, _inputs("llama")).sum().backward()
    optimizer.step()  # the optimizer holds the very same parameters


def _runs_normfuse(model, inputs) -> bool:
    with torch.profiler.profile() as prof:
        _logits(model, inputs).sum().backward()
    return "NormFunction" in {event.key for event in prof.key_averages()}


def test_accelerate_hooks_call_the_patched_forward():
    """accelerate's hooks (``device_map`` loading, offloading) set a ``forward`` on the instance
    that calls the class's forward kept, bound, in ``_old_forward``: swapping the class alone
    left the old forward running under a report that said patched."""
    hooks = pytest.importorskip("accelerate.hooks", reason="accelerate is not installed (pip install normfuse[test])")
    model = _build("llama").eval()
    reference = copy.deepcopy(model)
    for module in model.modules():
        hooks.add_hook_to_module(module, hooks.ModelHook())
    report = normfuse.patch(model, fuse_residual=True)
    assert len(report.patched) == 7 and not report.skipped, str(report)
    inputs = _inputs("llama")
    assert _runs_normfuse(model, inputs)
    assert norm_err(_logits(model, inputs).detach(), _logits(reference, inputs).detach()) <= 1e-5
    # removing the hooks leaves the (patched) forward bound on the instance; unpatch rebinds it
    for module in model.modules():
        hooks.remove_hook_from_module(module)
    assert _runs_normfuse(model, inputs)
    assert normfuse.unpatch(model) == 7 and not _runs_normfuse(model, inputs)
    assert norm_err(_logits(model, inputs).detach(), _logits(reference, inputs).detach()) == 0


def test_a_forward_replaced_on_the_instance_is_left_alone_and_reported():
    model = _build("llama").eval()
    reference = copy.deepcopy(model)
    norm, first, second = model.model.norm, *model.model.layers
    original_norm_forward = norm.forward
    norm.forward = lambda hidden_states: original_norm_forward(hidden_states)  # would shadow normfuse
    first.forward = lambda *args, **kwargs: type(first).forward(first, *args, **kwargs)
    second.forward = second.forward  # the class's own forward, bound: bound again to the fused one
    report = normfuse.patch(model, fuse_residual=True)
    assert [(e.path, "replaced on the instance" in e.reason) for e in report.skipped] == [
        ("model.norm", True), ("model.layers.0", True)
    ], str(report)  # fmt: skip
    assert type(norm).__name__ == "LlamaRMSNorm" and type(first).__name__ == "LlamaDecoderLayer"
    assert type(second).__name__ == "NormfuseFusedLlamaDecoderLayer" and second.forward.__func__ is type(second).forward
    inputs = _inputs("llama")
    assert norm_err(_logits(model, inputs).detach(), _logits(reference, inputs).detach()) <= 1e-5


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_norms_patch_and_unpatch_either_way_round():
    """``torch.nn.utils.parametrize`` gives a module a class of its own, over the one it had, and
    ``remove_parametrizations`` puts back that class's first base: normfuse's class goes below it,
    so that removing a parametrization (which failed on a patched module) and unpatching keep
    each other's work."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    with torch.no_grad():
        for norm in model[1:]:
            norm.weight.normal_(1.0, 0.3)
    parametrize.register_parametrization(model[1], "weight", _Doubled())  # before patching
    reference = copy.deepcopy(model)
    report = normfuse.patch(model)
    assert len(report.patched) == 2 and not report.skipped, str(report)
    assert type(model[1]).__name__ == "ParametrizedNormfuseLayerNorm"
    # the deepcopy shared parametrize's class with the module: it stays as it was
    assert type(reference[1]).__mro__[1] is torch.nn.LayerNorm
    parametrize.register_parametrization(model[2], "weight", _Doubled())  # after patching
    parametrize.register_parametrization(reference[2], "weight", _Doubled())
    x = torch.randn(3, 8, requires_grad=True)
    assert _runs_normfuse_on(model, x)
    projection = torch.randn(3, 8)  # not the square sum: an RMS norm's is nearly constant in x
    got = torch.autograd.grad((model(x) * projection).sum(), [x, *model.parameters()])
    want = torch.autograd.grad((reference(x) * projection).sum(), [x, *reference.parameters()])
    assert all(norm_err(g, w) <= 1e-5 for g, w in zip(got, want))
    parametrize.remove_parametrizations(model[1], "weight")
    assert type(model[1]).__name__ == "NormfuseLayerNorm" and _runs_normfuse_on(model[1], x)
    assert normfuse.unpatch(model) == 2
    assert type(model[1]) is torch.nn.LayerNorm and type(model[2]).__name__ == "ParametrizedRMSNorm"
    assert not _runs_normfuse_on(model, x)
    parametrize.remove_parametrizations(model[2], "weight")
    assert type(model[2]) is torch.nn.RMSNorm


def _runs_normfuse_on(module, x) -> bool:
    with torch.profiler.profile() as prof:
        module(x).sum().backward()
    return "NormFunction" in {event.key for event in prof.key_averages()}


def test_unpatch_restores_and_patch_twice_is_harmless():
    model = _build("llama")
    classes = [type(m) for m in model.modules()]
    first = normfuse.patch(model)
    second = normfuse.patch(model)
    assert len(first.patched) == 5 and len(second.patched) == 0
    assert normfuse.unpatch(model) == 5
    assert [type(m) for m in model.modules()] == classes


def test_other_instances_and_classes_are_untouched():
    patched, other = _build("llama"), _build("llama")
    normfuse.patch(patched)
    assert type(other.model.norm) is transformers.models.llama.modeling_llama.LlamaRMSNorm
    assert type(patched.model.norm) is not type(other.model.norm)


def test_dtype_device_and_mode_changes_keep_working():
    model = _build("llama")
    reference = copy.deepcopy(model)
    normfuse.patch(model)
    ids = _inputs("llama")
    model.eval()
    fp32 = _logits(model, ids)
    # the logits' dtype is the unpatched model's (transformers before 4.46 upcasts them to fp32)
    model.bfloat16()
    bf16 = _logits(model, ids)
    assert bf16.dtype == _logits(reference.bfloat16(), ids).dtype and bf16.dtype in (torch.bfloat16, torch.float32)
    assert norm_err(bf16.float(), fp32) < 5e-2
    model.half()
    assert _logits(model, ids).dtype == _logits(reference.half(), ids).dtype
    model.float().train()
    assert _logits(model, ids).dtype == torch.float32


def test_greedy_generate_is_identical():
    model = _build("llama").eval()
    reference = copy.deepcopy(model)
    normfuse.patch(model)
    prompt = _inputs("llama")["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


@pytest.mark.parametrize("fuse", [False, True])
def test_gradient_checkpointing_works(fuse):
    model = _build("llama")
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    reference = copy.deepcopy(model)
    report = normfuse.patch(model, fuse_residual=fuse)
    assert sum(e.fused_adds for e in report.patched) == (2 if fuse else 0)  # checkpointed layers fuse too
    ids = _inputs("llama")
    (g,) = torch.autograd.grad(_logits(model, ids).square().mean(), [model.model.norm.weight])
    (rg,) = torch.autograd.grad(_logits(reference, ids).square().mean(), [reference.model.norm.weight])
    assert norm_err(g, rg) < 1e-4


def test_save_pretrained_loads_into_the_unpatched_class(tmp_path):
    model = _build("gemma")
    normfuse.patch(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.GemmaForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.model.norm) is transformers.models.gemma.modeling_gemma.GemmaRMSNorm
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def _patched_classes(model):
    return [(path, type(m).__name__, getattr(type(m), "_normfuse_original_class", None)) for path, m in model.named_modules()]


@pytest.mark.parametrize("name", ["llama", "bert", "torch"])
def test_pickle_and_deepcopy_of_a_patched_model_keep_it_patched(name):
    model = _build(name).eval()
    normfuse.patch(model, fuse_residual=name != "torch")
    classes = _patched_classes(model)
    inputs = _inputs(name)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert _patched_classes(clone) == classes
        assert all(type(a) is type(b) for a, b in zip(clone.modules(), model.modules()))
        assert torch.equal(_logits(clone, inputs), _logits(model, inputs))
        assert normfuse.unpatch(clone) == {"llama": 7, "bert": 10, "torch": 5}[name]
    assert _patched_classes(model) == classes  # unpatching a clone leaves the model patched


_LOAD_IN_A_NEW_PROCESS = """
import sys, torch, normfuse
saved = torch.load(sys.argv[1], weights_only=False)
model, inputs = saved["model"], saved["inputs"]
classes = [(path, type(m).__name__, getattr(type(m), "_normfuse_original_class", None)) for path, m in model.named_modules()]
assert classes == saved["classes"], (classes, saved["classes"])
with torch.no_grad():
    out = model(**inputs)
logits = out if isinstance(out, torch.Tensor) else out.logits
assert torch.equal(logits, saved["logits"]), (logits - saved["logits"]).abs().max()
print("patched modules:", sum(original is not None for _, _, original in classes))
"""


@pytest.mark.parametrize("name", ["llama", "torch"])
def test_torch_save_of_a_whole_patched_model_loads_patched_in_a_new_process(name, tmp_path):
    # generated classes are in no module's namespace: pickle's lookup by name failed before
    model = _build(name).eval()
    normfuse.patch(model, fuse_residual=name == "llama")
    inputs = _inputs(name)
    with torch.no_grad():
        logits = _logits(model, inputs)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "inputs": inputs, "logits": logits, "classes": _patched_classes(model)}, path)
    root = Path(__file__).resolve().parents[2]  # the fresh process imports tests.patch for _Encoder
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_NEW_PROCESS, str(path)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"patched modules: {7 if name == 'llama' else 5}"


def test_onnx_export_of_a_patched_model_gives_its_logits():
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install normfuse[test])")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install normfuse[test])")
    # not tried there: the export fails inside transformers 4.57's vmap-built masks, patched or not,
    # and leaves functorch's vmap state behind for every later test of the process
    skip_where_older_torch_differs(
        OLDER_TRANSFORMERS,
        f"with transformers {transformers.__version__} does not export this model to ONNX, patched or not",
    )
    model = _build("llama").eval()
    reference = copy.deepcopy(model)
    normfuse.patch(model, fuse_residual=True)

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    ids = _inputs("llama")["input_ids"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), (ids,), buf, dynamo=True, verbose=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        assert norm_err(torch.from_numpy(logits), _logits(reference, {"input_ids": ids})) <= 1e-5


class _ChannelsFirstLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm subclass with its own forward (as in vision models): a permute around super()."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_layer_norm_subclass_keeps_its_own_forward():
    module = _ChannelsFirstLayerNorm(8)
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(2, 8, 5, 5)
    want = module(x)
    report = normfuse.patch(module)
    assert [e.formula for e in report.patched] == ["torch LayerNorm"]
    assert isinstance(module, _ChannelsFirstLayerNorm) and isinstance(module, normfuse.LayerNorm)
    assert norm_err(module(x), want) < 1e-6


class _OwnMathLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm subclass whose forward calls F.layer_norm itself (as VideoPrism's does)."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class _ByNameLayerNorm(torch.nn.LayerNorm):
    """Calls torch's forward by name (as SqueezeBERT's does): that skips whatever is below it."""

    def forward(self, x):
        return torch.nn.LayerNorm.forward(self, x.permute(0, 2, 1)).permute(0, 2, 1)


class _ScaledRMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_torch_norm_subclasses_are_patched_only_where_their_forward_reaches_normfuse(monkeypatch):
    model = torch.nn.Sequential(_OwnMathLayerNorm(8), _ByNameLayerNorm(8), _ChannelsFirstLayerNorm(8), _ScaledRMSNorm(8))
    x = torch.randn(2, 8, 4, 4)
    want_2, want_3 = model[2](x), model[3](x.permute(0, 2, 3, 1))
    report = normfuse.patch(model)
    assert [e.path for e in report.patched] == ["2", "3"]
    assert [(e.path, e.class_name) for e in report.skipped] == [("0", "_OwnMathLayerNorm"), ("1", "_ByNameLayerNorm")]
    assert all("does not go on through super().forward" in e.reason for e in report.skipped)
    assert type(model[0]) is _OwnMathLayerNorm and type(model[1]) is _ByNameLayerNorm
    # what is reported as patched runs normfuse: torch's functional norms are not called any more
    monkeypatch.setattr(torch.nn.functional, "layer_norm", None)
    monkeypatch.setattr(torch.nn.functional, "rms_norm", None)
    assert norm_err(model[2](x), want_2) < 1e-6
    assert norm_err(model[3](x.permute(0, 2, 3, 1)), want_3) < 1e-6


class _UnknownRMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + 0.1


def test_unrecognized_norms_are_left_alone_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), _UnknownRMSNorm(8), torch.nn.LayerNorm(8))
    report = normfuse.patch(model)
    assert [e.path for e in report.patched] == ["2"]
    assert [e.path for e in report.skipped] == ["1"] and "not recognized" in report.skipped[0].reason
    text = str(report)
    assert "1 norm(s) patched, 1 left alone" in text and "_UnknownRMSNorm" in text
    only_rms = normfuse.patch(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)), layer_norm=False)
    assert [e.path for e in only_rms.patched] == ["1"] and only_rms.skipped[0].reason == "not asked for"


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_compile_has_no_more_graph_breaks_than_unpatched(name):
    model = _build(name).eval()
    reference = copy.deepcopy(model)
    # the residual adds fused (pre-norm blocks compiled again; BERT's output blocks with their dropout)
    normfuse.patch(model, fuse_residual=True, fuse_dropout=name == "bert")
    ids = _inputs(name)["input_ids"]
    torch._dynamo.reset()
    patched = torch._dynamo.explain(lambda x: _logits(model, {"input_ids": x}))(ids)
    torch._dynamo.reset()
    original = torch._dynamo.explain(lambda x: _logits(reference, {"input_ids": x}))(ids)
    assert patched.graph_break_count <= original.graph_break_count


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gemma4", "llama4", "olmo", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_residual_gives_the_same_results_as_the_unfused_patch(name, dtype):
    """Pre-norm blocks (the decoder layers of Llama and its copies, GPT-2's block), their forward
    compiled again with the add before their second norm fused: bit for bit the unfused patch."""
    model = _build(name, dtype).eval()
    unfused, original = copy.deepcopy(model), copy.deepcopy(model)
    normfuse.patch(unfused)
    report = normfuse.patch(model, fuse_residual=True)
    fused_layers = [e for e in report.patched if e.formula.startswith("fused residual add")]
    _skip_where_transformers_4_is_left_alone(not fused_layers, f"{name}'s decoder layer")
    assert len(fused_layers) == 2 and "2 residual add(s) fused" in str(report)
    inputs = _inputs(name)
    logits = _logits(model, inputs)
    assert torch.equal(logits, _logits(unfused, inputs))  # bit for bit: the same roundings, fused
    assert norm_err(logits.detach(), _logits(original, inputs).detach()) <= (1e-5 if dtype == torch.float32 else 3e-2)
    grads = torch.autograd.grad(logits.float().square().mean(), list(model.parameters()))
    ref = torch.autograd.grad(_logits(unfused, inputs).float().square().mean(), list(unfused.parameters()))
    for g, r in zip(grads, ref):
        assert norm_err(g, r) <= (1e-5 if dtype == torch.float32 else 2e-2)
    prompt = inputs["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), original.generate(prompt, **kwargs))
    assert normfuse.unpatch(model) == len(report.patched)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


@pytest.mark.parametrize("name", ["bert", "deberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_residual_in_post_norm_output_blocks_gives_the_unfused_patch_bit_for_bit(name, dtype):
    """BERT's self-output and output blocks (dense, dropout, the norm of the residual sum; some 80
    classes copy them): fused, the add and the norm are one pass and the dropout stays torch's,
    so in training too the logits and gradients are the unfused patch's, bit for bit."""
    model = _build(name, dtype)
    unfused, original = copy.deepcopy(model), copy.deepcopy(model)
    normfuse.patch(unfused)
    report = normfuse.patch(model, fuse_residual=True)
    fused = [e.original_class.rsplit(".", 1)[1] for e in report.patched if e.formula.startswith("fused residual add")]
    _skip_where_transformers_4_is_left_alone(len(fused) != 4, f"{name}'s output blocks")
    prefix = "Bert" if name == "bert" else "Deberta"
    assert sorted(fused) == [f"{prefix}Output"] * 2 + [f"{prefix}SelfOutput"] * 2, str(report)
    assert not report.skipped, str(report)
    inputs = _inputs(name)
    for training in (True, False):
        results = []
        for module in (model, unfused):
            module.train(training)
            torch.manual_seed(5)  # the same dropout draws
            logits = _logits(module, inputs)
            results.append((logits, torch.autograd.grad(logits.float().square().mean(), list(module.parameters()))))
        (logits, grads), (same, same_grads) = results
        assert torch.equal(logits, same)
        assert all(torch.equal(g, r) for g, r in zip(grads, same_grads))
    with torch.no_grad():
        original.eval()
        assert norm_err(logits, _logits(original, inputs)) <= (1e-5 if dtype == torch.float32 else 3e-2)
    assert normfuse.unpatch(model) == len(report.patched)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


class _OwnDropout(torch.nn.Dropout):
    pass


def test_fuse_dropout_puts_bert_s_output_dropout_in_the_kernel(monkeypatch):
    """``fuse_dropout=True``: the output blocks' nn.Dropout joins the add and the norm (normfuse's
    masks: reproduced by the seed, not nn.Dropout's draws); eval mode is unchanged bit for bit.
    A dropout of another class stays as it is, its block fused without it."""
    model = _build("bert")
    unfused = copy.deepcopy(model)
    normfuse.patch(unfused)
    with pytest.raises(ValueError, match="pass both"):
        normfuse.patch(model, fuse_dropout=True)
    assert normfuse.unpatch(model) == 0  # refused before anything changed
    model.bert.encoder.layer[1].output.dropout.__class__ = _OwnDropout
    report = normfuse.patch(model, fuse_residual=True, fuse_dropout=True)
    fused = sorted(e.formula for e in report.patched if e.formula.startswith("fused"))
    assert fused == ["fused dropout + residual add + torch LayerNorm"] * 3 + ["fused residual add + torch LayerNorm"]
    inputs = _inputs("bert")
    calls = []
    real = normfuse.functional.add_layer_norm
    monkeypatch.setattr(normfuse.functional, "add_layer_norm", lambda *a, **k: calls.append(k) or real(*a, **k))
    model.eval(), unfused.eval()
    assert torch.equal(_logits(model, inputs), _logits(unfused, inputs))
    model.train()
    calls.clear()
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        logits = _logits(model, inputs)
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
        runs.append(logits.detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    p = model.config.hidden_dropout_prob
    dropping = [k for k in calls if k.get("dropout_p") == p and k.get("training") is True]
    assert len(dropping) == 3 * 3  # three blocks with the dropout fused, three runs
    clone = pickle.loads(pickle.dumps(model))
    assert [type(m).__name__ for m in clone.modules()] == [type(m).__name__ for m in model.modules()]
    torch.manual_seed(1)
    assert torch.equal(_logits(clone, inputs), runs[0])


def test_a_second_patch_with_fuse_dropout_takes_the_dropout_into_blocks_already_fused():
    model, once = _build("bert"), _build("bert")
    classes = [type(m) for m in model.modules()]
    first = normfuse.patch(model, fuse_residual=True)
    assert sum(e.formula == "fused residual add + torch LayerNorm" for e in first.patched) == 4
    second = normfuse.patch(model, fuse_residual=True, fuse_dropout=True)
    assert [e.formula for e in second.patched] == ["fused dropout + residual add + torch LayerNorm"] * 4
    normfuse.patch(once, fuse_residual=True, fuse_dropout=True)
    assert [type(m) for m in model.modules()] == [type(m) for m in once.modules()]
    assert normfuse.patch(model, fuse_residual=True, fuse_dropout=True).patched == []
    inputs = _inputs("bert")
    for seed in (3, 3):
        torch.manual_seed(seed)
        got = _logits(model.train(), inputs)
        torch.manual_seed(seed)
        assert torch.equal(got, _logits(once.train(), inputs))
    assert normfuse.unpatch(model) == len(first.patched)
    assert [type(m) for m in model.modules()] == classes


def test_compiled_bert_with_fused_dropout_gives_eager_logits_and_trains():
    """torch.compile over BERT's fused output blocks: eval logits as eager's; in training the
    compiled graph (whose seeds come from inductor's random numbers, not eager's, as nn.Dropout's
    masks do) gives finite gradients."""
    model = _build("bert")
    normfuse.patch(model, fuse_residual=True, fuse_dropout=True)
    compiled = torch.compile(model)
    ids = _inputs("bert")["input_ids"]
    model.eval()
    with torch.no_grad():
        assert norm_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5
    model.train()
    logits = compiled(input_ids=ids).logits
    grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("norm_class", [torch.nn.RMSNorm, torch.nn.LayerNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_residual_over_torch_s_own_norms_in_a_decoder_layer(norm_class, dtype):
    """A Llama-form decoder layer built with torch's nn.RMSNorm or nn.LayerNorm: the fused add
    gives the unfused patch's output bit for bit, and its gradients to rounding."""
    torch.manual_seed(0)
    layer = _Layer453(32, with_cache=False)
    layer.input_layernorm, layer.post_attention_layernorm = norm_class(32), norm_class(32)
    layer = layer.to(dtype)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
    unfused = copy.deepcopy(layer)
    normfuse.patch(unfused)
    report = normfuse.patch(layer, fuse_residual=True)
    formula = "torch RMSNorm" if norm_class is torch.nn.RMSNorm else "torch LayerNorm"
    assert [e.formula for e in report.patched] == [formula, formula, f"fused residual add + {formula}"], str(report)
    x = torch.randn(2, 5, 32).to(dtype)
    outs = []
    for module in (layer, unfused):
        x_ = x.clone().requires_grad_()
        (out,) = module(x_)
        outs.append((out, torch.autograd.grad(out.float().square().sum(), [x_, *module.parameters()])))
    (got, got_grads), (want, want_grads) = outs
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        # the residual stream's gradient is added inside the kernel (one rounding fewer)
        assert norm_err(g, w) <= (1e-6 if dtype == torch.float32 else 1e-2)


class _DoubledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2.0


class _BertOutputBlock(torch.nn.Module):
    """BERT's output block, verbatim, over a LayerNorm subclass with a forward of its own."""

    def __init__(self, width):
        super().__init__()
        self.dense = torch.nn.Linear(width, width)
        self.LayerNorm = _DoubledLayerNorm(width)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.LayerNorm(hidden_states + input_tensor)
        return hidden_states


def test_a_post_norm_block_over_a_norm_subclass_with_its_own_forward_is_not_fused():
    block = _BertOutputBlock(16).eval()
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    want = block(x, r)
    report = normfuse.patch(block, fuse_residual=True)
    assert [e.formula for e in report.patched] == ["torch LayerNorm"]
    assert [e.reason for e in report.skipped] == ["residual add not fused: its norm is not patched with a fusable formula"]
    assert norm_err(block(x, r), want) <= 1e-6


def test_fused_layer_takes_its_arguments_as_the_layer_does():
    """The fused forward binds the layer's arguments itself (no inspect.Signature, which Dynamo
    in torch 2.5 cannot trace): positional or by keyword, defaults filled in, and the
    layer's TypeErrors for arguments it cannot take."""
    model = _build("llama").eval()
    original = copy.deepcopy(model)
    normfuse.patch(model, fuse_residual=True)
    layer, twin = model.model.layers[0], original.model.layers[0]
    h = torch.randn(2, 5, twin.input_layernorm.weight.numel())
    position = torch.arange(5).expand(2, 5)
    embeddings = original.model.rotary_emb(h, position)
    want = twin(h, None, position, position_embeddings=embeddings)
    got = layer(h, None, position, position_embeddings=embeddings)
    want, got = (t[0] if isinstance(t, tuple) else t for t in (want, got))
    assert norm_err(got, want) <= 1e-5
    for fn in (twin, layer):
        with pytest.raises(TypeError, match="multiple values for argument 'attention_mask'"):
            fn(h, None, attention_mask=None)
    with pytest.raises(TypeError, match="positional arguments"):
        layer(h, *([None] * 20))


def test_fuse_residual_is_not_offered_where_the_norm_is_not_fusable():
    model = _build("llama")
    report = normfuse.patch(model, rms_norm=False, fuse_residual=True)
    assert not any(e.formula.startswith("fused") for e in report.patched)
    assert any("residual add not fused" in e.reason for e in report.skipped)


class _Attention(torch.nn.Module):
    """An attention stand-in that answers as transformers 4's did: (hidden states, weights) or
    (hidden states, weights, cache), the extras only where asked for."""

    def __init__(self, width: int, with_cache: bool):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.with_cache = with_cache

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False, **kwargs):
        out = self.proj(hidden_states) if attention_mask is None else self.proj(hidden_states) * attention_mask
        weights = out.sum(-1) if output_attentions else None
        return (out, weights, out.mean() if use_cache else None) if self.with_cache else (out, weights)


class _LayerBase(torch.nn.Module):
    def __init__(self, width: int, with_cache: bool):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.input_layernorm, self.post_attention_layernorm = LlamaRMSNorm(width), LlamaRMSNorm(width)
        self.self_attn = _Attention(width, with_cache)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.SiLU(), torch.nn.Linear(2 * width, width))


# The three layers below repeat each other on purpose: each is one release's source, which is
# what patch reads (a layer built from a shared helper would have another source).
class _Layer453(_LayerBase):
    """transformers 4.48-4.53's Llama decoder layer, verbatim but for the arguments."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, self_attn_weights = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (self_attn_weights,)
        return outputs


class _Layer445(_LayerBase):
    """transformers 4.45-4.47's, with the attention's cache."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, self_attn_weights, present_key_value = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (self_attn_weights,)
        if use_cache:
            outputs += (present_key_value,)
        return outputs


class _Qwen2Layer445(_LayerBase):
    """transformers 4.45's Qwen2 decoder layer: it takes **kwargs and does not pass them on."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, self_attn_weights, present_key_value = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            use_cache=use_cache,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (self_attn_weights,)
        if use_cache:
            outputs += (present_key_value,)
        return outputs


class _StrictAttention(_Attention):
    """One that takes no extra keyword: a layer passing its **kwargs on would fail with it."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False):
        return super().forward(hidden_states, attention_mask, output_attentions, use_cache)


@pytest.mark.parametrize(
    "layer_class,form", [(_Layer453, "outputs"), (_Layer445, "outputs and cache"), (_Qwen2Layer445, "outputs and cache")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_residual_in_the_decoder_layers_of_transformers_4(layer_class, form, dtype):
    """Before 4.54 a Llama decoder layer returned a tuple (with the attention weights, and before
    4.48 the cache, where asked for): the fused layer returns what the layer returns."""
    from normfuse.patch.rewrite import add_norm_names

    torch.manual_seed(0)
    layer = layer_class(32, with_cache=form == "outputs and cache").to(dtype)
    if layer_class is _Qwen2Layer445:
        layer.self_attn.__class__ = _StrictAttention
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.normal_(1.0, 0.3)
    assert add_norm_names(layer_class.forward) == ("post_attention_layernorm",)
    unfused, original = copy.deepcopy(layer), copy.deepcopy(layer)
    normfuse.patch(unfused)
    report = normfuse.patch(layer, fuse_residual=True)
    assert [e.formula for e in report.patched] == ["llama", "llama", "fused residual add + llama"], str(report)
    x = torch.randn(2, 5, 32).to(dtype)
    mask = (torch.rand(2, 5, 1) > 0.2).to(dtype)
    extra = {"position_ids": None} if layer_class is _Qwen2Layer445 else {}  # dropped by the layer
    for kwargs in ({}, {"output_attentions": True}, {"use_cache": True}, {"output_attentions": True, "use_cache": True}):
        kwargs = {**kwargs, **extra}
        outs = [module(x, mask, **kwargs) for module in (layer, unfused, original)]
        assert len({len(out) for out in outs}) == 1, kwargs
        (got, *got_rest), (same, *same_rest), (want, *_) = outs
        assert torch.equal(got, same)  # bit for bit: the same roundings, fused
        assert norm_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)
        for a, b in zip(got_rest, same_rest):
            assert torch.equal(a, b)
    x_ = x.clone().requires_grad_()
    grads = [torch.autograd.grad(module(x_)[0].float().square().sum(), [x_, *module.parameters()]) for module in (layer, unfused)]
    for g, r in zip(*grads):
        assert norm_err(g, r) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert normfuse.unpatch(layer) == 3 and type(layer) is layer_class


# (transformers module, class, the formula it computes, constructor arguments); None: a norm
# whose forward or ``_norm`` helper computes something else, which must be left alone
FAMILY_CLASSES = [
    ("mistral", "MistralRMSNorm", "llama", (32,)), ("mixtral", "MixtralRMSNorm", "llama", (32,)),
    ("qwen3", "Qwen3RMSNorm", "llama", (32,)), ("qwen3_moe", "Qwen3MoeRMSNorm", "llama", (32,)),
    ("phi3", "Phi3RMSNorm", "llama", (32,)), ("granite", "GraniteRMSNorm", "llama", (32,)),
    ("llama4", "Llama4TextRMSNorm", "llama", (32,)),
    ("olmo2", "Olmo2RMSNorm", "olmo2", (32,)), ("helium", "HeliumRMSNorm", "olmo2", (32,)),
    ("nemotron_h", "NemotronHRMSNorm", "olmo2", (32,)),
    ("gemma2", "Gemma2RMSNorm", "gemma", (32,)), ("gemma3", "Gemma3RMSNorm", "gemma", (32,)),
    ("gemma3n", "Gemma3nRMSNorm", "gemma4", (32,)), ("gemma4", "Gemma4RMSNorm", "gemma4", (32,)),
    ("gemma4", "Gemma4RMSNorm", "gemma4", (32, 1e-6, False)),  # with_scale=False: no weight
    ("moshi", "MoshiRMSNorm", "moshi", (32,)),
    ("kyutai_speech_to_text", "KyutaiSpeechToTextRMSNorm", "moshi", (32,)),
    ("ergo", "ErgoRMSNorm", "moshi", (32, 1e-6)),
    ("llama4", "Llama4TextL2Norm", "weightless", ()),
    ("falcon_mamba", "FalconMambaWeightlessRMSNorm", "weightless", (32,)),  # its weight is a dummy buffer
    ("inkling2", "Inkling2UnweightedRMSNorm", "weightless", ()),
    # rstd rounded to x's dtype before the multiply
    ("deepseek_v4", "DeepseekV4UnweightedRMSNorm", "rstd_rounded", ()),
    ("glm5_next", "Glm5NextTextUnweightedRMSNorm", "rstd_rounded", ()),
    ("mt5", "MT5LayerNorm", "t5", (32,)),
    ("olmo", "OlmoLayerNorm", "olmo", (32,)),
    ("deberta", "DebertaLayerNorm", "deberta", (32,)),
    ("qwen4_exp", "Qwen4ExpTextRMSNorm", "gemma", (32,)),  # group_size unset (set: left alone, below)
    ("muse_spark", "MuseSparkTextCenteredRMSNorm", "muse_spark", (32,)),
    # subclasses of torch's LayerNorm whose forward never reaches torch's
    ("squeezebert", "SqueezeBertLayerNorm", "squeezebert", (32,)),
    ("videoprism", "VideoPrismLayerNorm", "videoprism", (32,)),
    ("esmfold2", "EsmFold2LayerNorm", "esmfold2", (32,)),
    ("dory", "DoryL2Norm", None, ()),  # the L2 norm: a sum of squares, not a mean
    ("muse_spark", "MuseSparkTextInputScaledRMSNorm", None, (32,)),  # scales x by 1 + w before the norm
    ("hy_v4", "HYV4UnweightedRMSNorm", None, ()),  # gives rstd alone, not the normalized row
]  # fmt: skip


def _family_norm(module: str, cls: str, args: tuple) -> torch.nn.Module:
    mod = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    norm_cls = getattr(mod, cls, None)
    if norm_cls is None:
        pytest.skip(f"this transformers has no {cls}")
    return norm_cls(*args)


@pytest.mark.parametrize("module,cls,formula,args", FAMILY_CLASSES)
def test_the_families_copies_are_recognized_by_what_they_compute(module, cls, formula, args):
    from normfuse.patch.formulas import probe_agrees, recognize

    norm = _family_norm(module, cls, args)
    found = recognize(type(norm))
    _skip_where_transformers_4_is_left_alone(formula is not None and found is None, cls)
    if formula is None:
        assert found is None
        return
    assert found is not None and found.name == formula
    assert probe_agrees(norm, found) is None


class _Llama4TextRMSNorm457(torch.nn.Module):
    """transformers 4.57's Llama4TextRMSNorm, verbatim: eps in ``self.eps``, read by a helper."""

    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class _Llama4TextL2Norm457(torch.nn.Module):
    """transformers 4.57's Llama4TextL2Norm (an RMS norm without weight, despite its name)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x)


class _Gemma3nRMSNorm457(torch.nn.Module):
    """transformers 4.57's Gemma3nRMSNorm: divides by the root; a weight of 1.0 without scale."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if self.with_scale:
            self.weight = torch.nn.Parameter(torch.ones(dim))
        else:
            self.register_buffer("weight", torch.tensor(1.0), persistent=False)

    def _norm(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()) * self.weight.float()
        return output.type_as(x)


@pytest.mark.parametrize("norm_class,args,formula", [
    (_Llama4TextRMSNorm457, (32,), "llama"), (_Llama4TextL2Norm457, (), "weightless"),
    (_Gemma3nRMSNorm457, (32,), "gemma4"), (_Gemma3nRMSNorm457, (32, 1e-6, False), "gemma4"),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_transformers_4_spellings_read_eps_where_their_class_keeps_it(norm_class, args, formula, dtype):
    """transformers 4.57 keeps these norms' eps in ``self.eps`` where 5 has ``variance_epsilon``:
    the patched forward reads it from where the class's statements do (pickled ones too)."""
    from normfuse.patch.formulas import recognize

    found = recognize(norm_class)
    assert found is not None and found.name == formula and found.eps_attr == "eps"
    norm = norm_class(*args).to(dtype)
    norm.eps = 0.25  # large enough that reading another attribute's (or the default's) shows
    if isinstance(getattr(norm, "weight", None), torch.nn.Parameter):
        with torch.no_grad():
            norm.weight.normal_(0.5, 0.3)
    reference = copy.deepcopy(norm)
    model = torch.nn.Sequential(norm)
    report = normfuse.patch(model)
    assert [e.formula for e in report.patched] == [formula] and not report.skipped, str(report)
    x = (torch.randn(3, 5, 32) * 0.3).to(dtype)
    want = reference(x)
    for patched in (model, pickle.loads(pickle.dumps(model))):
        assert type(patched[0]).__name__.startswith("Normfuse")
        got = patched(x)
        assert got.dtype == want.dtype
        assert norm_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("module,cls,formula,args", [c for c in FAMILY_CLASSES if c[2] is not None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_family_norms_give_the_classes_outputs_and_gradients(module, cls, formula, args, dtype):
    torch.manual_seed(0)
    # ESMFold 2's norm takes float32 parameters only (a float32 input with 16-bit parameters raises)
    norm = _family_norm(module, cls, args).to(torch.float32 if formula == "esmfold2" else dtype)
    with torch.no_grad():
        for param in norm.parameters():
            param.normal_(0.5, 0.3)  # not the initial ones (or zeros): a wrong weight term shows
    reference = copy.deepcopy(norm)
    report = normfuse.patch(torch.nn.Sequential(norm))
    _skip_where_transformers_4_is_left_alone(not report.patched, cls)
    assert [e.formula for e in report.patched] == [formula] and not report.skipped, str(report)
    shape = (3, 32, 5) if formula == "squeezebert" else (3, 5, 32)  # SqueezeBERT's: (batch, channels, length)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    # a random projection: the square sum of a weightless norm's output is constant (zero gradient)
    projection = torch.randn(shape)
    outs, grads = [], []
    for module_ in (norm, reference):
        x_ = x.clone().requires_grad_()
        y = module_(x_)
        outs.append(y)
        params = list(module_.parameters())
        grads.append(torch.autograd.grad((y.float() * projection).sum(), [x_, *params]))
    (got, want), (got_grads, want_grads) = outs, grads
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.detach(), want.detach()
    if dtype == torch.float32:
        assert norm_err(got, want) <= 1e-6  # the row sums in another order
    else:
        # the same roundings in the same places give the same bits, bar an output whose fp32 value
        # (row sums in another order) sits on a rounding boundary; a rounding moved elsewhere (the
        # x-hat cast of the Llama formula, say) changes a quarter of them
        assert (got != want).float().mean().item() <= 0.01
    for g, rg in zip(got_grads, want_grads):
        assert g.dtype == rg.dtype
        # bf16: the class's autograd rounds its intermediate gradients to bf16 (2^-9 relative)
        assert norm_err(g, rg) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_configuration_outside_the_recognized_formula_is_left_alone_and_reported():
    """A recognized forward whose class is built otherwise than the formula covers: Qwen4-Exp's
    norm over groups of features, ESMFold 2's with 16-bit parameters (the class raises, and so
    does the patched module), VideoPrism's without weight (it raises on every input)."""
    qwen4_exp = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")
    esmfold2 = pytest.importorskip("transformers.models.esmfold2.modeling_esmfold2")
    videoprism = pytest.importorskip("transformers.models.videoprism.modeling_videoprism")
    model = torch.nn.ModuleDict(
        {
            "grouped": qwen4_exp.Qwen4ExpTextRMSNorm(32, group_size=8),
            "whole": qwen4_exp.Qwen4ExpTextRMSNorm(32),
            "esm_bf16": esmfold2.EsmFold2LayerNorm(32).to(torch.bfloat16),
            "no_weight": videoprism.VideoPrismLayerNorm(32, elementwise_affine=False),
        }
    )
    reference = copy.deepcopy(model)
    report = normfuse.patch(model)
    assert [(e.path, e.formula) for e in report.patched] == [("whole", "gemma"), ("esm_bf16", "esmfold2")]
    reasons = {e.path: e.reason for e in report.skipped}
    assert reasons.keys() == {"grouped", "no_weight"}
    assert reasons["grouped"].startswith("group_size=8:")
    assert reasons["no_weight"].startswith("the class raises on the probe's input in every dtype")
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    for module in (model["esm_bf16"], reference["esm_bf16"]):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            module(x)
    assert normfuse.patch(torch.nn.Sequential(esmfold2.EsmFold2LayerNorm(32)), layer_norm=False).skipped[0].reason == "not asked for"


def test_cohere_layer_norm_and_its_per_head_variant():
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm

    model = torch.nn.ModuleDict({"plain": CohereLayerNorm(32), "per_head": CohereLayerNorm((4, 8))})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.3)
    reference = copy.deepcopy(model)
    report = normfuse.patch(model)
    assert [(e.path, e.formula) for e in report.patched] == [("plain", "cohere")]
    assert [e.path for e in report.skipped] == ["per_head"] and "weight of shape (4, 8)" in report.skipped[0].reason
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = (torch.randn(3, 5, 32) * 2 + 1).to(dtype)
        got, want = model["plain"].to(dtype)(x), reference["plain"].to(dtype)(x)
        assert got.dtype == want.dtype == dtype
        assert norm_err(got, want) <= (1e-6 if dtype != torch.bfloat16 else 1e-2)


def test_normfuse_modules_are_left_as_they_are():
    model = torch.nn.Sequential(normfuse.LayerNorm(8), normfuse.RMSNorm(8), torch.nn.LayerNorm(8))
    report = normfuse.patch(model)
    assert [e.path for e in report.patched] == ["2"] and not report.skipped
    assert type(model[0]) is normfuse.LayerNorm and type(model[1]) is normfuse.RMSNorm
    x = torch.randn(3, 8)
    assert torch.equal(model(x), model(x))


def test_cohere_follows_the_layer_norm_switch():
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm

    model = torch.nn.Sequential(CohereLayerNorm(16))
    assert normfuse.patch(model, layer_norm=False).skipped[0].reason == "not asked for"
    assert [e.formula for e in normfuse.patch(model, rms_norm=False).patched] == ["cohere"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_per_sample_gradients_of_a_patched_model(name):
    # torch.func over a whole model: functional_call, vmap over the samples, grad of each
    model = _build(name).eval()
    patched = copy.deepcopy(model)
    normfuse.patch(patched)
    ids = _inputs(name)["input_ids"]

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, sample):
            return _logits_of(m, p, sample[None]).logsumexp(-1).sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids)

    want, got = per_sample(model), per_sample(patched)
    assert want.keys() == got.keys()
    assert all(norm_err(got[k], want[k]) < 1e-5 for k in want)


def _logits_of(model, params, ids):
    out = torch.func.functional_call(model, params, (ids,))
    return out if isinstance(out, torch.Tensor) else out.logits
