"""The exact range check before a table answers on an accelerator
(rope_patch.cache.bounds), tested without CUDA: the reduction is counted,
and tables on CPU are marked as an accelerator's would be (bound check on,
the gather's own IndexError out of play)."""

from __future__ import annotations

import threading

import numpy
import pytest
import torch

import rope_patch
from rope_patch import cache
from rope_patch.cache import bounds, rule
from tests.conftest import assert_identical, module_state, unpatched
from tests.models import TINY, llama_rotary, transformers_major

#: ``id()``s standing for the modules whose calls read positions.
MODULE, OTHER_MODULE = 1, 2


@pytest.fixture
def reductions(monkeypatch):
    """Counts the reductions bounds runs (each one a host sync on an accelerator)."""
    bounds.forget()
    count = [0]
    original = bounds._aminmax

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(bounds, "_aminmax", counting)
    yield count
    bounds.forget()


def as_if_on_an_accelerator(module) -> list:
    """Make every table of ``module`` check bounds before answering, as on an
    accelerator (the tables stay on CPU, where the test runs)."""
    state = cache.state_of(module)
    tables = list(state.tables.values())
    assert tables
    for table in tables:
        table.on_cpu, table.bound_check = False, True
        table.answers.clear()  # compiled for a CPU table: compile again for this one
    state.forget_answers()
    return tables


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([[5, -3, 9, 0]]),
        lambda: torch.arange(12).view(3, 4).t(),
        lambda: torch.tensor([[7]]).expand(4, 6),
        lambda: torch.arange(24).view(3, 2, 4) - 4,
    ],
    ids=["negative", "transposed", "expanded", "three-axis"],
)
def test_extent_is_the_minimum_and_maximum(make, dtype):
    positions = make().to(dtype)
    assert bounds.extent(positions, MODULE, object()) == (positions.min().item(), positions.max().item())


def test_the_same_unchanged_tensor_is_reduced_once_for_the_other_tables_of_its_module(reductions):
    positions = torch.tensor([[3, 4, 5]])
    first, second, third = object(), object(), object()
    assert bounds.extent(positions, MODULE, first) == (3, 5)
    assert bounds.extent(positions, MODULE, second) == (3, 5)
    assert bounds.extent(positions, MODULE, third) == (3, 5)
    assert reductions[0] == 1
    assert bounds.extent(positions, OTHER_MODULE, first) == (3, 5)  # never shared between modules
    assert reductions[0] == 2


def test_a_table_asking_again_about_the_same_tensor_reduces_again(reductions):
    # A persistent position buffer refilled by a writer that bumps no version
    # (a raw Triton launch, dist.broadcast): the next step is the same table asking again.
    positions = torch.tensor([[3, 4, 5]])
    table, other = object(), object()
    assert bounds.extent(positions, MODULE, table) == (3, 5)
    positions.numpy()[0, 2] = 50  # written behind torch's back
    assert bounds.extent(positions, MODULE, table) == (3, 50)
    assert bounds.extent(positions, MODULE, other) == (3, 50)  # the fresh reading serves the other table
    assert reductions[0] == 2


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p.add_(100),
        lambda p: p.copy_(torch.tensor([[100, 101, 102]])),
        lambda p: p.__setitem__((0, 0), -1),
        lambda p: setattr(p, "data", torch.tensor([[1, 2, 300]])),
        lambda p: p.set_(torch.tensor([[1, 2, 300]])),
    ],
    ids=["add_", "copy_", "setitem", "data=", "set_"],
)
def test_an_edited_tensor_is_reduced_again(reductions, edit):
    positions = torch.tensor([[3, 4, 5]])
    table, other = object(), object()
    assert bounds.extent(positions, MODULE, table) == (3, 5)
    edit(positions)
    assert bounds.extent(positions, MODULE, other) == (positions.min().item(), positions.max().item()) != (3, 5)
    assert reductions[0] == 2


def test_inference_tensors_are_always_reduced(reductions):
    table, other = object(), object()
    with torch.inference_mode():
        positions = torch.tensor([[3, 4, 5]])
        assert bounds.extent(positions, MODULE, table) == (3, 5)
        positions.add_(100)  # no version counter records this
        assert bounds.extent(positions, MODULE, other) == (103, 105)
    assert reductions[0] == 2


def test_another_tensor_or_a_view_is_reduced(reductions):
    positions = torch.tensor([[3, 4, 5]])
    table = object()
    assert bounds.extent(positions, MODULE, table) == (3, 5)
    assert bounds.extent(positions[:, :2], MODULE, object()) == (3, 4)
    del positions
    assert bounds.extent(torch.tensor([[3, 4, 50]]), MODULE, object()) == (3, 50)  # maybe at the same address
    assert reductions[0] == 3


def test_the_slow_path_reads_the_extent_once_per_call(reductions, patched):
    # It sizes the table from the extent and then checks the table: one reading.
    module = llama_rotary()
    x = torch.randn(1, 3, 64)
    positions = torch.tensor([[0, 1, 2]])
    assert_identical(unpatched(module, x, positions), module(x, positions))
    as_if_on_an_accelerator(module)
    far = torch.tensor([[0, 1, 200]])  # beyond the table: the slow path grows it
    before = reductions[0]
    assert_identical(unpatched(module, x, far), module(x, far))
    assert reductions[0] - before == 1


def test_buffers_made_under_inference_mode_serve_outside_it(reductions):
    results = []

    def fresh_thread():  # a thread has buffers of its own, made on first use
        with torch.inference_mode():
            results.append(bounds.extent(torch.tensor([[1, 2]]), MODULE, object()))
        results.append(bounds.extent(torch.tensor([[4, 9]]), MODULE, object()))

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert results == [(1, 2), (4, 9)]


def test_threads_reduce_into_their_own_buffers():
    errors = []

    def worker(offset):
        for step in range(300):
            positions = torch.arange(offset + step, offset + step + 5)[None]
            if bounds.extent(positions, offset, object()) != (offset + step, offset + step + 4):
                errors.append((offset, step))

    threads = [threading.Thread(target=worker, args=(1000 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_the_rule_refuses_positions_outside_the_table_before_any_gather(patched):
    module = llama_rotary()
    x = torch.randn(1, 2, 64)
    module(x, torch.tensor([[0, 1]]))
    module(x, torch.tensor([[1, 0]]))  # first real call verified the form
    (table,) = as_if_on_an_accelerator(module)
    for positions, answers in (
        ([[0, table.size - 1]], True),
        ([[0, table.size]], False),
        ([[-1, 0]], False),
    ):
        form = rule.answering_form(table, x, torch.tensor(positions))
        assert (form is not None) is answers, positions


def test_a_model_with_one_rotary_call_per_attention_type_reads_positions_once(reductions, patched):
    # Gemma 3: sliding and full attention have their own rotary tables, both
    # fed the same position_ids in one forward: one module keyed by layer
    # type on 5.x (one reading), two modules on 4.57 (one reading each:
    # readings are never shared between modules).
    import transformers

    layer_types = ["sliding_attention", "full_attention"]
    config = transformers.Gemma3TextConfig(**dict(TINY, head_dim=16, sliding_window=8, layer_types=layer_types))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        model(input_ids)  # builds and verifies the tables
        model(input_ids)
        tables = [t for m in model.modules() if cache.state_of(m) for t in as_if_on_an_accelerator(m)]
        assert len(tables) == 2
        step = input_ids[:, -1:]
        positions = torch.tensor([[5]])
        with rope_patch.disabled():
            expected = model(step, position_ids=positions).logits
        before = reductions[0]
        actual = model(step, position_ids=positions).logits
    assert reductions[0] - before == (1 if transformers_major() >= 5 else 2)
    assert_identical(expected, actual)


def test_models_sharing_a_buffer_refilled_behind_torch_never_share_a_reading(patched):
    # A draft and a target model fed one position buffer, refilled between
    # their calls by a writer that bumps no version: each reads its own.
    from tests.test_rope_types import LONGROPE

    def longrope_pair():
        kwargs = {"max_position_embeddings": 1024}
        if transformers_major() < 5:
            kwargs["original_max_position_embeddings"] = 256
        return llama_rotary(LONGROPE, **kwargs), llama_rotary(LONGROPE, **kwargs)

    (first, first_twin), (second, second_twin) = longrope_pair(), longrope_pair()
    x = torch.randn(1, 1, 64)
    for module, twin in ((first, first_twin), (second, second_twin)):  # both on their long set, verified
        for positions in (torch.arange(300)[None], torch.tensor([[300]]), torch.tensor([[301]])):
            activation = torch.randn(*positions.shape, 64)
            assert_identical(unpatched(twin, activation, positions), module(activation, positions))
    values = numpy.array([[300]])
    shared = torch.from_numpy(values)
    assert_identical(unpatched(first_twin, x, shared), first(x, shared))
    values[0, 0] = 10  # the short set's range now
    assert_identical(unpatched(second_twin, x, shared), second(x, shared))
    assert module_state(second) == module_state(second_twin)
