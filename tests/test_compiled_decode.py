"""The compiled decode step (sampler_svc/compiled.py): the same tokens and logprobs as the
eager step, over reloads and next to adapter rows; the choice made by measurement and
cached; a compile that fails leaves the engine eager; a bad --compile is refused.

Compiling costs seconds per graph even for the tiny models here (one graph per model
shape: every row count, one row run as two), so each test builds as few shapes as it can.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from torch._dynamo.utils import compilation_time_metrics, counters

from headway.modeling import LoraConfig
from headway.server import kernel_cache
from sampler_svc import compiled
from sampler_svc.engine import Engine
from sampler_svc.kernels import ATTENTIONS
from sampler_svc.multilora import AdapterBank
from sampler_svc.requests import row_generator
from sampler_svc.sampling import DrawParams
from tests.test_devices import _service_refusal
from tests.test_sampler_engine import adapter, mixed_run, run, tiny_model

PROMPT = [5, 17, 33, 8, 41, 12]

pytestmark = pytest.mark.slow  # compiling: seconds per graph


def engine_of(
    model: torch.nn.Module, mode: str, max_batch: int = 8, max_seq_len: int = 128
) -> Engine:
    bank = AdapterBank(model, slots=2, max_rank=8)
    bank.load(1, LoraConfig(rank=4, alpha=8), adapter(bank, 4, seed=7))
    return Engine(model, bank, max_batch=max_batch, max_seq_len=max_seq_len, compile=mode)


class Calls(list):
    """Rows of every call of the compiled decode; `shapes`: (rows, window, guards run)."""

    shapes: list[tuple[int, int, bool]]

    def clear(self) -> None:
        super().clear()
        self.shapes.clear()


@pytest.fixture()
def compiled_calls(monkeypatch) -> Calls:
    """Rows of every call of the compiled decode (the calls go through)."""
    calls = Calls()
    calls.shapes = []
    decode = compiled.decode

    def counting(model, ids, positions, caches, layouts, guards=True):
        calls.append(ids.shape[0])
        calls.shapes.append((ids.shape[0], caches[0].max_len, guards))
        return decode(model, ids, positions, caches, layouts, guards)

    monkeypatch.setattr(compiled, "decode", counting)
    return calls


def outputs(engine: Engine) -> dict:
    """Greedy one row, sampled three rows and all eight, with and without the adapter, and
    mixed rows; 70 tokens each, so the window grows past its first 64 positions (a new
    window shape)."""
    out = {}
    for n, slot, temp in [(1, 0, 0.0), (3, 0, 1.0), (8, 0, 1.0), (1, 1, 0.0), (3, 1, 1.0)]:
        draws = [DrawParams(temp, 1.0, 0, row_generator(3, i)) for i in range(n)]
        out[n, slot] = run(engine, PROMPT, n, slot, draws, max_tokens=70)
    out["mixed"] = mixed_run(engine, PROMPT)
    return out


def assert_same(got: dict, want: dict) -> None:
    for key in want:
        for (tg, lg), (tw, lw) in zip(got[key], want[key], strict=True):
            assert tg == tw, key
            assert np.abs(lg - lw).max() <= 1e-5, key


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_a_compiled_engine_decodes_the_eager_tokens_and_logprobs(family, compiled_calls):
    """Rows without an adapter decode compiled (one row, several, as many as the engine
    holds, across a window change), rows with one eagerly, and both in one batch: every
    token the eager engine's, every logprob within 1e-5. One graph serves it all: one row
    runs as two (a copy in the free cache row), traced once (no restart of the analysis,
    which the model's float constants traced as symbols caused: a third of the compile)."""
    eager = engine_of(tiny_model(family), "off")
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    attempts = {
        k: len(compilation_time_metrics.get(k, []))
        for k in ("compile_attempt_0", "compile_attempt_1")
    }
    fast = engine_of(tiny_model(family), "on")
    assert fast.compiler.compiled == {1, 2, 4, 8}, fast.compiler.error
    made = counters["stats"]["unique_graphs"] - before
    assert made == 1  # 2..8 rows at any window, and one row as two
    assert (
        len(compilation_time_metrics.get("compile_attempt_0", []))
        == attempts["compile_attempt_0"] + 1
    )
    assert (
        len(compilation_time_metrics.get("compile_attempt_1", [])) == attempts["compile_attempt_1"]
    )
    compiled_calls.clear()
    assert_same(outputs(fast), outputs(eager))
    assert {2, 3, 8} <= set(compiled_calls)  # the steps without adapters went through it
    assert 1 not in compiled_calls
    assert counters["stats"]["unique_graphs"] - before == made  # no recompiles
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compiled.cache_dir())


def test_graphs_run_their_full_guards_once_per_shape_and_still_tell_models_apart(
    compiled_calls,
):
    """A row count and window reach the graph with its full guards once; later steps of
    that shape run only the guards that tell graphs apart (`compiled.decode`). Two models
    of different architectures (q/k norms, biases, tied embeddings) compiled in one
    process, decoding in turns that way, each still give their eager tokens and logprobs."""
    families = ("qwen3", "qwen2")
    want = {f: outputs(engine_of(tiny_model(f), "off")) for f in families}
    fast = {f: engine_of(tiny_model(f), "on") for f in families}
    assert all(e.compiler.compiled == {1, 2, 4, 8} for e in fast.values())
    compiled_calls.clear()
    for family in ("qwen3", "qwen2", "qwen3"):
        assert_same(outputs(fast[family]), want[family])
    guarded = [(rows, window) for rows, window, guards in compiled_calls.shapes if guards]
    skipped = [(rows, window) for rows, window, guards in compiled_calls.shapes if not guards]
    assert skipped and len(skipped) > 10 * len(guarded)
    # Each engine ran each shape's guards once (warming ran 2 rows at its first window).
    assert sorted(guarded) == sorted(2 * list(set(guarded)))
    assert set(skipped) <= set(guarded) | {(2, 64)}


def test_an_engine_of_one_row_has_a_one_row_graph(compiled_calls):
    """With no free cache row to run one row as two, one row is a graph of its own."""
    draws = [DrawParams(0.0, 1.0, 0, row_generator(3, 0))]
    want = run(engine_of(tiny_model("qwen3"), "off", max_batch=1), PROMPT, 1, 0, draws, 40)
    fast = engine_of(tiny_model("qwen3"), "on", max_batch=1)
    assert fast.compiler.compiled == {1}, fast.compiler.error
    compiled_calls.clear()
    draws = [DrawParams(0.0, 1.0, 0, row_generator(3, 0))]
    got = run(fast, PROMPT, 1, 0, draws, 40)
    assert set(compiled_calls) == {1}
    for (tg, lg), (tw, lw) in zip(got, want, strict=True):
        assert tg == tw and np.abs(lg - lw).max() <= 1e-5


def test_the_graphs_projections_run_the_layouts_measured_for_their_rows(compiled_calls):
    """Each projection in the graph runs the kernel the engine's table holds for the
    call's row bucket (`headway::decode_linear`), once per layer per compiled step; the
    graph attends the way `KernelChoice.graph_attention` chose."""
    engine = engine_of(tiny_model("qwen3"), "on")
    seen: Counter = Counter()
    for bucket, table in engine.kernels._tables.items():
        for shape, fn in table.items():

            def spy(x, weight, bias=None, fn=fn, key=(bucket, shape)):
                if x.dim() == 3 and x.shape[1] == 1:  # a decode step's rows, not a prefill
                    seen[(*key, x.shape[0])] += 1
                return fn(x, weight, bias)

            table[shape] = spy
    compiled_calls.clear()
    draws = [DrawParams(1.0, 1.0, 0, row_generator(3, i)) for i in range(3)]
    run(engine, PROMPT, 3, 0, draws, max_tokens=20)
    steps = compiled_calls.count(3)
    assert steps == len(compiled_calls) >= 15  # 3 rows: bucket 4's table
    layers = engine.model.config.num_hidden_layers
    vocab = tuple(engine.model.lm_head.weight.shape)
    shapes = [s for s in engine.kernels._tables[4] if s != vocab]
    assert shapes and all(seen[4, s, 3] == layers * steps for s in shapes), seen
    assert not any(b != 4 for b, _, _ in seen)
    window = engine._window(2, 64, graph=True)
    assert all(view.decode_attention is ATTENTIONS[engine._graph_attention] for view in window)


def test_the_graph_attends_the_way_fastest_summed_over_its_row_buckets():
    """One graph serves every row count, so it attends one way: the least total of the
    measured times over the buckets it serves (SDPA unless another beats it by 5 %)."""
    kernels = engine_of(tiny_model("qwen3"), "off").kernels
    for b in kernels.buckets:
        grouped = 1.5 if b <= 2 else 0.1  # slower than SDPA at few rows, faster at many
        kernels.times[("attention", 0), b] = {"sdpa": 1.0, "grouped": grouped, "grouped_fp32": 3.0}
    assert kernels.graph_attention([1, 2]) == "sdpa"
    assert kernels.graph_attention([1, 2, 4, 8]) == "grouped"  # 3.2 s against 4
    assert kernels.graph_attention([1, 2, 4]) == "sdpa"  # 3.1 against 3: within 5 %
    assert kernels.graph_attention([]) == "sdpa"


def test_each_cache_size_has_a_static_graph_of_its_own(compiled_calls):
    """Engines of one model with different cache sizes compile a graph each: the caches'
    sizes stay static (torch would otherwise make a size that fails a guard a symbol, in a
    slower graph that then serves the earlier engines too). Decoding in turns, each gives
    its eager tokens and logprobs without another compile, and the layouts table is empty
    between calls (it would keep an engine's packed copies alive)."""
    before = counters["stats"]["unique_graphs"]
    fast = {}
    for n, length in enumerate((72, 96, 160)):  # sizes no other test's engine has
        fast[length] = engine_of(tiny_model("qwen3"), "on", max_seq_len=length)
        assert fast[length].compiler.compiled == {1, 2, 4, 8}, fast[length].compiler.error
        assert counters["stats"]["unique_graphs"] == before + n + 1
    draws = lambda: [DrawParams(1.0, 1.0, 0, row_generator(5, i)) for i in range(3)]  # noqa: E731
    for length in (96, 160, 72, 96):
        eager = engine_of(tiny_model("qwen3"), "off", max_seq_len=length)
        compiled_calls.clear()
        got = run(fast[length], PROMPT, 3, 0, draws(), max_tokens=80)
        assert compiled_calls and compiled._layouts == {}
        want = run(eager, PROMPT, 3, 0, draws(), max_tokens=80)
        assert_same({0: got}, {0: want})
    assert counters["stats"]["unique_graphs"] == before + 3


def test_a_full_reload_is_served_by_the_same_graphs(compiled_calls):
    """New weights copied into the parameters (a full reload) decode compiled exactly as an
    eager engine of those weights, without compiling anew; so does a second engine."""
    fast = engine_of(tiny_model("qwen3"), "on")
    outputs(fast)
    graphs = counters["stats"]["unique_graphs"]
    other = engine_of(tiny_model("qwen3", seed=4), "on")
    assert_same(outputs(other), outputs(engine_of(tiny_model("qwen3", seed=4), "off")))
    assert counters["stats"]["unique_graphs"] == graphs
    new = tiny_model("qwen3", seed=5)
    with torch.no_grad():
        for p, q in zip(fast.model.parameters(), new.parameters(), strict=True):
            p.copy_(q)
    fast.weights_changed()
    compiled_calls.clear()
    got = outputs(fast)
    assert compiled_calls and counters["stats"]["unique_graphs"] == graphs
    assert_same(got, outputs(engine_of(tiny_model("qwen3", seed=5), "off")))


def test_auto_compiles_where_measured_faster_and_keeps_the_timings(tmp_path, monkeypatch):
    """--compile auto times both ways per row bucket, chooses compiled where it is 5%
    faster, and caches the timings: the next engine of the shape measures nothing and
    chooses the same."""
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    first = engine_of(tiny_model("qwen3"), "auto")
    times = first.compiler.times
    assert sorted(times) == [1, 2, 4, 8]
    # (Where the first graph tried does not pay, the rest is not timed: the test above.)
    if sum("compiled" in t for t in times.values()) == 1:
        pytest.skip(f"compiled lost at the most promising bucket here: {first.compiler.describe()}")
    assert first.compiler.compiled == {
        b for b, t in times.items() if t["compiled"] < 0.95 * t["eager"]
    }
    cached = {k: v for k, v in kernel_cache.read_cache().items() if "decode compiled" in k}
    assert len(cached) == 4 and all(
        set(v["times"]) == {"eager", "compiled"} for v in cached.values()
    )
    stamp = (tmp_path / "kernels.json").stat().st_mtime_ns
    again = engine_of(tiny_model("qwen3", seed=3), "auto")
    assert again.compiler.times == times and again.compiler.compiled == first.compiler.compiled
    assert (tmp_path / "kernels.json").stat().st_mtime_ns == stamp  # nothing measured anew


def test_auto_compiles_the_most_promising_graph_first_and_stops_where_it_does_not_pay(
    tmp_path, monkeypatch
):
    """A compiled decode that loses (here: made slow) where the graph promises most: the
    other graph is never compiled, no bucket decodes compiled, and the timings show the
    one bucket measured both ways beside the others' eager time and graph floor."""

    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    calls: list[int] = []
    decode = compiled.decode

    def slow(model, ids, positions, caches, layouts, guards=True):
        calls.append(ids.shape[0])
        compiled._layouts.update(layouts)  # the graph's projections' table, as `decode` sets
        for _ in range(3):  # three eager forwards first: slower than eager on any machine
            compiled.decode_hidden(model, ids, positions, caches)
        return decode(model, ids, positions, caches, layouts, guards)

    monkeypatch.setattr(compiled, "decode", slow)
    engine = engine_of(tiny_model("qwen3"), "auto")
    times = engine.compiler.times
    assert engine.compiler.compiled == set() and engine.compiler.error == ""
    measured = [b for b, t in times.items() if "compiled" in t]
    assert len(measured) == 1 and sorted(times) == [1, 2, 4, 8]
    assert all(set(t) == {"eager", "graph floor"} for b, t in times.items() if b != measured[0])
    assert calls and len({min(rows, 2) for rows in calls}) == 1  # one graph compiled, run
    cached = [k for k in kernel_cache.read_cache() if "decode compiled" in k]
    assert len(cached) == 1


def test_a_compile_that_fails_leaves_the_engine_eager(monkeypatch):
    """A compile error (no C++ compiler, an op inductor cannot lower) is logged and the
    engine decodes eagerly, as an engine with --compile off does."""

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(compiled, "decode", broken)
    engine = engine_of(tiny_model("qwen3"), "on")
    assert engine.compiler.compiled == set()
    assert engine.compiler.error == "RuntimeError: no C++ compiler"
    assert_same(outputs(engine), outputs(engine_of(tiny_model("qwen3"), "off")))


def test_auto_compiles_nothing_where_the_cached_timings_say_eager(tmp_path, monkeypatch):
    """Cached timings where eager wins every bucket: the engine neither compiles nor
    measures (a compile here would fail, and must not be tried)."""
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    first = engine_of(tiny_model("qwen3"), "auto")
    kernel_cache.write_cache(
        {
            k: {"times": {"eager": 1.0, "compiled": 2.0}}
            for k in kernel_cache.read_cache()
            if "decode compiled" in k
        }
    )
    monkeypatch.setattr(compiled, "decode", lambda *a, **k: pytest.fail("compiled"))
    again = engine_of(tiny_model("qwen3"), "auto")
    assert again.compiler.compiled == set() and again.compiler.error == ""
    assert first.compiler.times.keys() == again.compiler.times.keys()


def test_auto_measures_a_bf16_engine_as_an_fp32_one(tmp_path, monkeypatch):
    """bf16 in auto mode is chosen by measurement, as fp32 (on a 2-core EPYC the graph
    lost at 8+ rows, on a Xeon with AMX it won at every row count): every bucket timed
    (or found unable to pay before compiling), compiled exactly where it measured faster."""
    from sampler_svc.kernels import pick

    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    engine = engine_of(tiny_model("qwen3").to(torch.bfloat16), "auto")
    times = engine.compiler.times
    assert sorted(times) == [1, 2, 4, 8] and engine.compiler.error == ""
    assert all("eager" in t and ("compiled" in t or "graph floor" in t) for t in times.values())
    assert engine.compiler.compiled == {b for b, t in times.items() if pick(t) == "compiled"}


def test_auto_does_not_compile_where_the_graphs_matmuls_alone_outlast_eager(tmp_path, monkeypatch):
    """Where the projections, the graph's matmuls in their measured layouts, took longer
    than the engine's whole eager forward (here: made so in the kernel cache), compiling
    cannot pay: nothing compiled, and the timings say why."""
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    engine_of(tiny_model("qwen3"), "off")  # measures and caches the layouts
    slow = {}
    for key, entry in kernel_cache.read_cache().items():
        if "linear" in entry.get("times", {}):  # every layout: a second a pass
            slow[key] = {"times": dict.fromkeys(entry["times"], 1.0)}
    kernel_cache.write_cache(slow)
    monkeypatch.setattr(compiled, "decode", lambda *a, **k: pytest.fail("compiled"))
    engine = engine_of(tiny_model("qwen3"), "auto")
    assert engine.compiler.compiled == set() and engine.compiler.error == ""
    for times in engine.compiler.times.values():
        assert times["graph floor"] >= 1.0 > times["eager"]


def test_an_engine_of_any_row_count_measures_within_its_rows(tmp_path, monkeypatch):
    """--max-batch 6 (bucket 8 holds at most 6 rows) and --max-batch 1 (no second graph)."""
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    six = engine_of(tiny_model("qwen3"), "auto", max_batch=6)
    assert sorted(six.compiler.times) == [1, 2, 4, 8] and six.compiler.error == ""
    one = engine_of(tiny_model("qwen3"), "on", max_batch=1)
    assert one.compiler.compiled == {1} and one.compiler.error == ""
    assert_same(
        {0: run(one, PROMPT, 1, 0, [DrawParams(0.0)], max_tokens=20)},
        {0: run(engine_of(tiny_model("qwen3"), "off"), PROMPT, 1, 0, [DrawParams(0.0)], 20)},
    )


def test_inductor_keeps_its_code_beside_the_kernel_cache(tmp_path, monkeypatch):
    """Compiled code lands where a restart finds it: beside the kernel cache, unless
    $TORCHINDUCTOR_CACHE_DIR said otherwise when the sampler started."""
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "k" / "kernels.json"))
    monkeypatch.setattr(compiled, "_USER_CACHE_DIR", None)
    assert compiled.cache_dir() == tmp_path / "k" / "inductor"
    monkeypatch.setattr(compiled, "_USER_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled.cache_dir() == tmp_path / "mine"


def test_the_sampler_refuses_an_unknown_compile_mode(tmp_path, monkeypatch, capsys):
    err = _service_refusal("sampler_svc", ["--compile", "maybe"], tmp_path, monkeypatch, capsys)
    assert "--compile 'maybe': choose among auto, on, off" in err
