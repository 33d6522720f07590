"""Drop-in safety: every path a real program takes behaves exactly as
unpatched (issue 9). One test (or a few) per item of the issue:

1-5  the staleness signal: inference tensors, ``.data`` assignment, learnable
     and grad-requiring frequencies, per-call config reads, offload hooks
     that swap in equal copies;
6-7  tracers and transforms: jit.trace, legacy and dynamo ONNX export,
     make_fx, torch.export, dispatch modes, vmap, grad of functional_call;
8-12 edges: fork while a table is built, M-RoPE memory (test_mrope.py),
     a wrapper applied after patch() survives unpatch(), tiny
     ROPE_PATCH_MAX_POSITIONS, position_ids on another device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import transformers

import rope_patch
from rope_patch.identity import difference
from tests import models
from tests.conftest import answered, assert_identical, subprocess_env, unpatched, unpatched_or_skip
from tests.models import llama_config, llama_rotary, transformers_major


def greedy(model, ids, new_tokens=6):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.scores)


def gradients(module, x, positions, wrt):
    """Output, and d(sum of outputs)/d(each tensor in ``wrt``), with grad on
    (None for each when the output carries no graph: transformers 4.x
    rotary forwards run under ``torch.no_grad()``)."""
    for tensor in wrt:
        tensor.grad = None
    with torch.enable_grad():
        out = module(x, positions)
        if not out[0].requires_grad:
            return out, [None for _ in wrt]
        sum(part.float().sum() for part in out).backward()
    return out, [tensor.grad.clone() for tensor in wrt]


def assert_same_gradients(expected, actual):
    assert [g is None for g in expected] == [g is None for g in actual]
    for want, got in zip(expected, actual):
        if want is not None:
            assert_identical(want, got)


# --------------------------------------------------------------------------
# Gap 1: what the forward reads


def test_1_model_built_generated_and_loaded_under_inference_mode(patched, tmp_path):
    ids = torch.randint(0, models.TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # an @torch.inference_mode() main, a serving loader
        model = models.causal_lm("LlamaConfig")
        assert model.model.rotary_emb.inv_freq.is_inference()
        tokens, scores = greedy(model, ids)
        with rope_patch.disabled():
            reference = greedy(model, ids)
    assert_identical(reference[0], tokens)
    assert_identical(reference[1], scores)
    assert answered(model.model.rotary_emb)
    model.save_pretrained(tmp_path)
    with torch.inference_mode():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with rope_patch.disabled():
            reference = greedy(loaded, ids)
        assert_identical(reference[1], greedy(loaded, ids)[1])
    with torch.no_grad():  # and outside inference mode, on the same inference buffers
        with rope_patch.disabled():
            reference = greedy(model, ids)
        assert_identical(reference[1], greedy(model, ids)[1])


def test_1_in_place_edit_of_an_inference_buffer_is_seen(patched):
    with torch.inference_mode():
        module = llama_rotary()
        x, positions = torch.randn(1, 4, 64), torch.tensor([[0, 5, 300, 1999]])
        module(x, positions)
        module.inv_freq.mul_(0.5)  # no version counter on inference tensors: values tell
        assert_identical(unpatched(module, x, positions), module(x, positions))
        assert answered(module)


def test_2_data_assignment_is_seen(patched):
    module = llama_rotary()
    x, positions = torch.randn(1, 4, 64), torch.tensor([[0, 5, 300, 1999]])
    module(x, positions)
    module.inv_freq.data = module.inv_freq * 0.5  # bumps no version counter; the storage changes
    assert_identical(unpatched(module, x, positions), module(x, positions))


def test_3_a_buffer_made_to_require_grad_gets_the_unpatched_gradient(patched):
    module, twin = llama_rotary(), llama_rotary()
    x, positions = torch.randn(1, 5, 64), torch.tensor([[0, 3, 90, 700, 1500]])
    module(x, positions)  # a table exists
    for rotary in (module, twin):
        rotary.inv_freq.requires_grad_()
    with rope_patch.disabled():
        expected, expected_grads = gradients(twin, x, positions, [twin.inv_freq])
    out, grads = gradients(module, x, positions, [module.inv_freq])
    assert_identical(expected, out)
    assert out[0].requires_grad == expected[0].requires_grad
    assert type(out[0].grad_fn) is type(expected[0].grad_fn)
    assert_same_gradients(expected_grads, grads)
    with torch.no_grad():  # without grad, the table answers again
        assert_identical(unpatched(module, x, positions), module(x, positions))


def test_3_inv_freq_made_a_parameter_gets_the_unpatched_gradient(patched):
    module, twin = llama_rotary(), llama_rotary()
    x, positions = torch.randn(1, 5, 64), torch.tensor([[0, 3, 90, 700, 1500]])
    module(x, positions)
    for rotary in (module, twin):
        value = rotary.inv_freq.clone()
        del rotary.inv_freq
        rotary.inv_freq = torch.nn.Parameter(value)
    with rope_patch.disabled():
        expected, expected_grads = gradients(twin, x, positions, [twin.inv_freq])
    out, grads = gradients(module, x, positions, [module.inv_freq])
    assert_identical(expected, out)
    assert_same_gradients(expected_grads, grads)


def lerope_class():
    """A LeRoPE-like rotary (MistralLarge4's: a learned ``alpha`` Parameter
    scales inv_freq), written on Llama's so it exists on both lines."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class LearnedScaleRotaryEmbedding(LlamaRotaryEmbedding):
        def __init__(self, config):
            super().__init__(config)
            self.alpha = torch.nn.Parameter(torch.zeros_like(self.inv_freq))

        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * (self.inv_freq.float() * self.alpha.float().exp())
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    return LearnedScaleRotaryEmbedding


def test_3_learnable_parameters_train_and_their_updates_are_seen(patched):
    cls = lerope_class()
    rope_patch.patch_class(cls)
    module, twin = cls(llama_config()), cls(llama_config())
    x, positions = torch.randn(2, 4, 64), torch.tensor([[0, 9, 99, 999], [4, 3, 2, 1]])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (module, twin)]
    for _ in range(3):  # train: the gradient must reach alpha, identically
        with rope_patch.disabled():
            expected, expected_grads = gradients(twin, x, positions, [twin.alpha])
        out, grads = gradients(module, x, positions, [module.alpha])
        assert_identical(expected, out)
        assert_same_gradients(expected_grads, grads)
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():  # evaluation after each step: the table follows alpha
            assert_identical(unpatched(twin, x, positions), module(x, positions))
    assert answered(module)
    module.load_state_dict({"alpha": torch.full_like(module.alpha, 0.25)})
    with torch.no_grad():
        assert_identical(unpatched(module, x, positions), module(x, positions))


@pytest.mark.skipif(transformers_major() < 5, reason="MistralLarge4 (LeRoPE) exists only in transformers 5.x")
def test_3_mistral_large4_lerope_alpha(patched):
    from transformers.models.mistral_large4 import configuration_mistral_large4 as configuration
    from transformers.models.mistral_large4 import modeling_mistral_large4 as modeling

    config = configuration.MistralLarge4TextConfig(**dict(models.TINY, head_dim=16))
    module = modeling.MistralLarge4TextRotaryEmbedding(config)
    x, positions = torch.randn(1, 4, 64), torch.tensor([[0, 7, 70, 700]])
    with torch.no_grad():
        module(x, positions)
        module.alpha.fill_(0.1)  # a loaded checkpoint's alpha
        assert_identical(unpatched(module, x, positions), module(x, positions))
        assert answered(module)
    with rope_patch.disabled():
        expected, expected_grads = gradients(module, x, positions, [module.alpha])
    out, grads = gradients(module, x, positions, [module.alpha])
    assert_identical(expected, out)
    assert_same_gradients(expected_grads, grads)


def config_reading_class():
    """A rotary whose forward reads ``self.config`` on every call (as
    Phimoe's does in transformers 5.x), written here for both lines."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class ConfigReadingRotaryEmbedding(LlamaRotaryEmbedding):
        def forward(self, x, position_ids):
            dim = self.config.hidden_size // self.config.num_attention_heads
            inv_freq = 1.0 / (self.config.theta_for_test ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    return ConfigReadingRotaryEmbedding


def test_4_a_forward_reading_the_config_follows_config_edits(patched):
    cls = config_reading_class()
    rope_patch.patch_class(cls)
    config = llama_config()
    config.theta_for_test = 10000.0
    module = cls(config)
    x, positions = torch.randn(1, 4, 64), torch.tensor([[0, 7, 70, 700]])
    module(x, positions)
    assert answered(module)
    module.config.theta_for_test = 500.0
    assert_identical(unpatched(module, x, positions), module(x, positions))
    module.config.num_attention_heads = 2  # head size 32: another shape
    assert_identical(unpatched(module, x, positions), module(x, positions))


def test_4_phimoe_follows_edits_of_its_config(patched):
    """Phimoe's forward reads its config on every call (5.x: forward(x,
    position_ids); 4.57: forward(x, seq_len))."""
    from transformers.models.phimoe import modeling_phimoe

    config = transformers.PhimoeConfig(**dict(models.TINY, num_local_experts=2))
    module = modeling_phimoe.PhimoeRotaryEmbedding(config)
    x = torch.randn(1, 4, 64)
    args = (torch.tensor([[0, 7, 70, 700]]),) if transformers_major() >= 5 else (701,)
    assert_identical(unpatched(module, x, *args), module(x, *args))
    assert_identical(unpatched(module, x, *args), module(x, *args))
    assert answered(module)
    if transformers_major() >= 5:
        module.config.rope_parameters["rope_theta"] = 1234.0
    else:
        module.config.rope_theta = 1234.0
    assert_identical(unpatched(module, x, *args), module(x, *args))


def test_a_read_that_cannot_be_watched_keeps_the_module_unpatched(patched):
    """A forward that reads something whose changes no check can see (here
    a submodule's weight) is never answered from tables, and says why."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class ScaledByLayerRotaryEmbedding(LlamaRotaryEmbedding):
        def __init__(self, config):
            super().__init__(config)
            self.scale = torch.nn.Linear(1, 1, bias=False)

        def forward(self, x, position_ids):
            cos, sin = super().forward(x, position_ids)
            return cos * self.scale.weight[0, 0], sin * self.scale.weight[0, 0]

    rope_patch.patch_class(ScaledByLayerRotaryEmbedding)
    module = ScaledByLayerRotaryEmbedding(llama_config()).requires_grad_(False)
    x, positions = torch.randn(1, 4, 64), torch.tensor([[0, 7, 70, 700]])
    assert_identical(unpatched(module, x, positions), module(x, positions))
    module.scale.weight.fill_(2.0)
    assert_identical(unpatched(module, x, positions), module(x, positions))
    assert "submodule" in rope_patch.cache_info(module).fallback


def test_5_offload_hooks_swapping_in_equal_buffers_keep_the_table(patched, monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    from rope_patch.cache import engine

    builds = []
    build_table = engine.build_table
    monkeypatch.setattr(engine, "build_table", lambda *a, **k: builds.append(1) or build_table(*a, **k))
    model = models.causal_lm("LlamaConfig")
    ids = torch.randint(0, models.TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(1))
    with rope_patch.disabled(), torch.no_grad():
        reference = greedy(model, ids, new_tokens=8)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=True)
    with torch.no_grad():
        tokens, scores = greedy(model, ids, new_tokens=8)
    assert_identical(reference[0], tokens)
    assert_identical(reference[1], scores)
    assert answered(model.model.rotary_emb)
    assert len(builds) == 1, f"{len(builds)} tables built for 9 forwards"


# --------------------------------------------------------------------------
# Gap 2: tracers and transforms see the original


def positions_beyond_the_table():
    return torch.arange(100, 140)[None]


def test_6_jit_trace_after_a_call_and_without_one():
    x = torch.randn(1, 40, 64)
    unpatched_or_skip("torch.jit.trace", lambda: torch.jit.trace(llama_rotary(), (x, torch.arange(40)[None])))
    assert rope_patch.patch()
    for warm_up in (True, False):
        module = llama_rotary()
        if warm_up:
            module(x, torch.arange(40)[None])  # a 64-position table exists
        traced = torch.jit.trace(module, (x, torch.arange(40)[None]), check_trace=False)
        beyond = positions_beyond_the_table()
        assert_identical(unpatched(module, x, beyond), traced(x, beyond))


def onnx_outputs(module, x, positions, path, dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")
    kwargs = {"dynamo": dynamo}
    if dynamo:
        pytest.importorskip("onnxscript")
        seq = torch.export.Dim("seq", min=2, max=4096)
        kwargs["dynamic_shapes"] = ({1: seq}, {1: seq})
    else:
        kwargs["dynamic_axes"] = {"x": {1: "seq"}, "position_ids": {1: "seq"}}
    torch.onnx.export(
        module, (x, torch.arange(x.shape[1])[None]), str(path), input_names=["x", "position_ids"], **kwargs
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "position_ids": positions.numpy()}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})  # x may be pruned


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_6_onnx_export_is_the_unpatched_graph(tmp_path, dynamo):
    pytest.importorskip("onnx")
    module = llama_rotary()
    x = torch.randn(1, 40, 64)
    beyond = positions_beyond_the_table()
    exporter = f"torch.onnx.export({'dynamo=True, dynamic_shapes' if dynamo else 'dynamo=False, dynamic_axes'})"
    reference = unpatched_or_skip(
        exporter, lambda: onnx_outputs(module, x, beyond, tmp_path / "unpatched.onnx", dynamo)
    )
    assert rope_patch.patch()
    module(x, torch.arange(40)[None])  # a 64-position table exists
    patched_run = onnx_outputs(module, x, beyond, tmp_path / "patched.onnx", dynamo)
    for want, got in zip(reference, patched_run):
        assert (want == got).all()


def test_6_make_fx_traces_the_original():
    from torch.fx.experimental.proxy_tensor import make_fx

    module = llama_rotary()
    x = torch.randn(1, 40, 64)
    beyond = positions_beyond_the_table()

    def trace():
        # A two-argument function: make_fx traces every parameter of the forward it is given.
        return make_fx(lambda x, p: module(x, p))(x, torch.arange(40)[None])  # noqa: PLW0108

    unpatched_or_skip("make_fx", lambda: trace()(x, beyond))
    assert rope_patch.patch()
    module(x, torch.arange(40)[None])
    assert_identical(unpatched(module, x, beyond), trace()(x, beyond))


def test_6_torch_export_traces_the_original():
    module = llama_rotary()
    x = torch.randn(1, 40, 64)
    beyond = positions_beyond_the_table()

    def export():
        return torch.export.export(module, (x, torch.arange(40)[None])).module()

    unpatched_or_skip("torch.export.export", lambda: export()(x, beyond))
    assert rope_patch.patch()
    module(x, torch.arange(40)[None])
    assert_identical(unpatched(module, x, beyond), export()(x, beyond))


def test_6_dispatch_modes_observe_the_original_ops(patched):
    """A TorchDispatchMode (make_fx, FakeTensorMode, FlopCounterMode and
    profilers are built on them) sees the ops the unpatched forward runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    module = llama_rotary()
    x, positions = torch.randn(2, 30, 64), torch.arange(30)[None].expand(2, -1)
    module(x, positions)
    seen = []
    for context in (rope_patch.disabled, torch.no_grad):
        with context(), Recorder() as recorder:
            out = module(x, positions)
        seen.append(recorder.ops)
    assert seen[0] == seen[1] and "aten.embedding.default" not in seen[1]
    assert_identical(unpatched(module, x, positions), out)


def test_7_vmap_over_position_ids():
    module = llama_rotary()
    x = torch.randn(1, 6, 64)
    batched = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 70, 700, 1, 1, 9]])
    expected = unpatched_or_skip("torch.func.vmap", lambda: torch.func.vmap(lambda p: module(x, p[None]))(batched))
    assert rope_patch.patch()
    module(x, torch.arange(6)[None])
    assert_identical(expected, torch.func.vmap(lambda p: module(x, p[None]))(batched))


def test_7_grad_of_functional_call_with_replaced_inv_freq():
    module = llama_rotary()
    x, positions = torch.randn(1, 4, 64), torch.tensor([[0, 7, 70, 700]])

    def loss(inv_freq):
        cos, sin = torch.func.functional_call(module, {"inv_freq": inv_freq}, (x, positions))
        return cos.sum() + sin.sum()

    frequencies = module.inv_freq.clone() * 1.5
    expected_grad = unpatched_or_skip("torch.func.grad of functional_call", lambda: torch.func.grad(loss)(frequencies))
    # and a plain functional_call (no transform)
    expected_call = torch.func.functional_call(module, {"inv_freq": frequencies}, (x, positions))
    assert rope_patch.patch()
    module(x, positions)
    assert_identical(expected_grad, torch.func.grad(loss)(frequencies))
    assert_identical(expected_call, torch.func.functional_call(module, {"inv_freq": frequencies}, (x, positions)))
    assert_identical(unpatched(module, x, positions), module(x, positions))  # the module's own buffer again


# --------------------------------------------------------------------------
# Gap 3: edges


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_8_fork_while_another_thread_builds_a_table(patched):
    from rope_patch import cache

    module = llama_rotary()
    x = torch.randn(1, 1, 64)
    module(x, torch.tensor([[3]]))
    holding, release = threading.Event(), threading.Event()

    def builder():  # holds the module's lock as a build in progress does
        with cache.state_of(module).lock:
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=builder)
    thread.start()
    holding.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: its copy of the lock must not be held
        try:
            positions = torch.tensor([[1500]])  # beyond the table: needs the lock
            ok = difference(unpatched(module, x, positions), module(x, positions)) is None
        except BaseException:  # noqa: BLE001
            ok = False
        os._exit(0 if ok else 1)
    release.set()
    thread.join()
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child deadlocked on an inherited lock")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def test_10_a_wrapt_wrapper_applied_after_patch_survives_unpatch():
    import wrapt
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as cls

    original = cls.__dict__["forward"]
    calls = []

    def counting(wrapped, instance, args, kwargs):
        calls.append(1)
        return wrapped(*args, **kwargs)

    try:
        assert rope_patch.patch()
        wrapt.wrap_function_wrapper(cls, "forward", counting)
        foreign = cls.__dict__["forward"]
        rope_patch.unpatch()
        assert cls.__dict__["forward"] is foreign  # the tracer stays
        assert foreign.__wrapped__ is original  # with the original beneath it
        module = llama_rotary()
        module(torch.randn(1, 3, 64), torch.arange(3)[None])
        assert calls and rope_patch.cache_info(module).tables == ()
    finally:
        if rope_patch.is_patched():
            rope_patch.unpatch()
        cls.forward = original


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_11_tiny_max_positions_answer_every_call(cap):
    assert rope_patch.patch(max_positions=cap)
    module = llama_rotary()
    x = torch.randn(1, 1, 64)
    for position in (0, 1, 2, 5, 0):
        positions = torch.tensor([[position]])
        assert_identical(unpatched(module, x, positions), module(x, positions))
    assert answered(module)


def test_11_tiny_max_positions_from_the_environment():
    code = textwrap.dedent(
        """
        import torch, rope_patch.auto
        from tests.models import llama_rotary
        module = llama_rotary()
        for p in (0, 1, 7):
            module(torch.randn(1, 1, 64), torch.tensor([[p]]))
        print(rope_patch.cache_info(module).answered)
        """
    )
    for value in ("1",):  # 2 and 3: test_11_tiny_max_positions_answer_every_call, in-process
        child = subprocess.run(  # the return code is checked below
            [sys.executable, "-c", code],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env=subprocess_env(ROPE_PATCH_MAX_POSITIONS=value),
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("device", ["meta"])
def test_12_position_ids_on_another_device_raise_as_unpatched(patched, device):
    module = llama_rotary()
    x, positions = torch.randn(1, 3, 64), torch.arange(3)[None]
    module(x, positions)
    module(x, positions)
    other = positions.to(device)
    try:
        expected = unpatched(module, x, other)
    except Exception as error:  # noqa: BLE001
        with pytest.raises(type(error)):
            module(x, other)
    else:
        assert difference(expected, module(x, other)) is None
