"""GPU readiness checked on CPU: CUDA-graph workspace and tables, device guard,
availability under the interpreter, the segments cache, the compile matrix script and the
GPU check script's dry run.

Capture logic runs with the capture check monkeypatched (``triton_impl._capturing``) and
the kernels through the interpreter; what needs a GPU is in scripts/gpu_check.sh.
"""
import os
import subprocess
import sys

import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import _args

from cases import assert_matches_reference, make_grads, random_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
interpreter = pytest.mark.interpreter


def _impl():
    from ortholora_kernels.backends import triton_impl
    return triton_impl


def _triton_or_skip():
    impl = _impl()
    if impl._IMPORT_ERROR is not None:
        pytest.skip(impl._IMPORT_ERROR)
    return impl


@interpreter
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_captured_calls_get_their_own_zeroed_workspace(monkeypatch, reduction):
    """Under capture each call allocates and zeroes its own tickets (graph
    memory, a memset node), never the cached eager set, which may hold anything."""
    impl = _impl()
    segs = [0, 100, 900]
    seg = _args.segments_for(segs, 900)
    seg._device_cache.clear()
    monkeypatch.setattr(impl, "_TARGET_PROGRAMS", 2)   # several chunks and groups per segment
    monkeypatch.setattr(impl, "_GROUP", 2)
    x = make_grads(5, 900, seed=1, shared=-0.5)
    order = random_order(5, 2, seed=2)
    ok.project(x, segs, order=order, reduction=reduction, backend="triton")   # eager: builds the cache
    cached = [v for k, v in seg._device_cache.items() if k[0] == "triton_ws"]
    assert cached
    for parts, tickets, *_ in cached:
        tickets.fill_(7)                  # what another graph's half-finished replay could leave
        parts.fill_(float("nan"))
    seen = []
    real_workspace = impl._workspace

    def spy(*a, **k):
        ws = real_workspace(*a, **k)
        seen.append(ws)
        return ws
    monkeypatch.setattr(impl, "_workspace", spy)
    monkeypatch.setattr(impl, "_capturing", lambda device: True)
    outs = [ok.project(x, segs, order=order, reduction=reduction, backend="triton") for _ in range(2)]
    for out in outs:
        assert_matches_reference(out, x, segs, order=order, reduction=reduction)
    cached_ptrs = {t.data_ptr() for _, t, *_ in cached}
    fresh = [t for _, t, *_ in seen]
    assert len({t.data_ptr() for t in fresh}) == len(fresh)            # one workspace per captured call
    assert not cached_ptrs & {t.data_ptr() for t in fresh}
    assert all(int(t.ne(7).sum()) == 0 for _, t, *_ in cached)               # the eager set untouched
    seg._device_cache.clear()


@interpreter
def test_tables_built_under_capture_are_not_cached(monkeypatch):
    """A layout first seen inside a capture gets graph-owned tables, uploaded from a kept
    host buffer, and they never enter the cache that later eager calls read."""
    impl = _impl()
    segs = [0, 33, 500]
    seg = _args.segments_for(segs, 500)
    seg._device_cache.clear()
    pinned = len(impl._PINNED)
    monkeypatch.setattr(impl, "_capturing", lambda device: True)
    x = make_grads(3, 500, seed=3, shared=-0.5)
    order = random_order(3, 2, seed=4)
    out = ok.project(x, segs, order=order, backend="triton")
    assert_matches_reference(out, x, segs, order=order)
    assert not [k for k in seg._device_cache if k[0] in ("triton_table", "triton_ws")]
    assert len(impl._PINNED) > pinned
    monkeypatch.setattr(impl, "_capturing", lambda device: False)
    again = ok.project(x, segs, order=order, backend="triton")
    assert [k for k in seg._device_cache if k[0] == "triton_table"]      # eager calls cache their own
    assert torch.equal(again, out)
    seg._device_cache.clear()


def test_layout_table_parts_are_aligned_views_of_one_upload():
    impl = _triton_or_skip()
    seg = _args.segments_for([0, 1, 300, 1000], 1000)
    lay = impl._Layout(seg, torch.device("cpu"), 64)
    base = lay.table.data_ptr()
    for part in (lay.table, lay.chunk_off, lay.group_off, lay.seg_group_off):
        assert part.untyped_storage().data_ptr() == lay.table.untyped_storage().data_ptr()
        assert (part.data_ptr() - base) % 16 == 0
    assert lay.chunk_off.tolist() == [0, 1, 6, 17] and lay.seg_group_off.tolist()[-1] == lay.n_groups
    assert lay.table[:, 1].tolist()[:3] == [0, 1, 65] and lay.table[-1].tolist()[2] == 1000


def test_device_guard_switches_only_when_needed(monkeypatch):
    """A cuda:1 tensor with cuda:0 current launches under a guard for cuda:1."""
    impl = _triton_or_skip()
    entered = []

    class FakeDevice:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with impl._guard(torch.device("cuda", 1)):
        pass
    with impl._guard(torch.device("cuda", 0)):
        pass
    with impl._guard(torch.device("cpu")):
        pass
    assert entered == [1]


@interpreter
def test_every_launch_runs_under_the_device_guard(monkeypatch):
    impl = _impl()
    calls = []
    real = impl._guard

    def spy(device):
        calls.append(device)
        return real(device)
    monkeypatch.setattr(impl, "_guard", spy)
    x = make_grads(3, 200, seed=5, shared=-0.5).requires_grad_()
    out = ok.project(x, [0, 50, 200], order=random_order(3, 2, seed=6), backend="triton")
    assert len(calls) == 2                                   # Gram + combine
    out.backward(torch.ones_like(out))
    assert len(calls) == 5 and all(d == x.device for d in calls)   # + the backward's three


def test_availability_cuda_refuses_the_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 at import, kernels are interpreted: not for CUDA."""
    impl = _triton_or_skip()
    monkeypatch.setattr(impl, "_INTERPRETED", True)
    reason = impl.availability(torch.device("cuda"))
    assert reason is not None and "TRITON_INTERPRET" in reason
    monkeypatch.setattr(impl, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in impl.availability(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert impl.availability(torch.device("cuda")) is None


def test_segments_cache_keeps_layouts_with_device_tables(monkeypatch):
    """Triton's side: the bounded layout cache never drops a layout whose
    tables a captured graph may still read."""
    monkeypatch.setattr(_args, "_SEGMENTS_CACHE", {})
    monkeypatch.setattr(_args, "_MAX_CACHED_LAYOUTS", 3)
    keep = _args.segments_for([0, 5, 10], 10)
    keep.offsets_tensor("cpu")                       # now holds a table
    plain = _args.segments_for([0, 3, 10], 10)
    for n in range(11, 16):                          # overflow the bound several times
        _args.segments_for([0, 1, n], n)
    assert _args.segments_for([0, 5, 10], 10) is keep
    assert _args.segments_for([0, 3, 10], 10) is not plain
    assert len(_args._SEGMENTS_CACHE) <= 3


# ------------------------------------------------------------- the scripts CI runs


def _run(cmd, timeout=600, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


@pytest.mark.slow
def test_compile_gpu_fails_on_a_kernel_that_does_not_compile(tmp_path):
    """compile_gpu.py turns a compile error into a failed row, the summary and exit 1."""
    impl = _triton_or_skip()
    if impl._INTERPRETED:
        pytest.skip("the interpreter compiles nothing")
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import compile_gpu as c\n"
        "def broken(job):\n"
        "    return dict(error='CompilationError: injected', secs=0.0) if job[0] == '_combine_kernel' "
        "else dict(regs=40, spills=0, smem=0, error=None, secs=0.0, **c.ptx_facts(''))\n"
        "c.compile_one = broken\n"
        "sys.exit(c.main(['--tasks', '3', '--dtypes', 'fp32', '-j', '1', '--csv', sys.argv[1]]))\n"
    )
    out = _run([sys.executable, "-c", code, str(tmp_path / "rows.csv")], timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    # (fused, unfused) x ((fwd, bwd) x 3 reductions + the Gram pass alone, which has no combine)
    assert lines[-1] == "2 configurations compiled, 12 failed"
    assert sum(line.startswith("T=3 ") and "FAILED" in line for line in lines) == 12



# ------------------------------------------------------- the extension built at first use


def _missing(name):
    raise ModuleNotFoundError("No module named 'ortholora_kernels._C'")


def test_jit_build_is_off_with_ortholora_jit_0(monkeypatch):
    from ortholora_kernels.backends import native_impl
    monkeypatch.setattr(native_impl, "_state", {})
    monkeypatch.setattr(native_impl.importlib, "import_module", _missing)
    monkeypatch.setenv("ORTHOLORA_JIT", "0")
    monkeypatch.setattr(native_impl, "_jit_build", lambda: pytest.fail("JIT build attempted with ORTHOLORA_JIT=0"))
    assert "not built" in native_impl.availability(torch.device("cpu"))
    assert native_impl.origin() is None


def test_jit_build_at_first_use(monkeypatch, tmp_path, capsys):
    """A missing extension is built once with torch.utils.cpp_extension.load from csrc/ with
    setup.py's plan, into the cache folder, and backends_available says so. (The compiler
    is faked here: a real build takes minutes; scripts/gpu_check.sh builds for real.)"""
    import torch.utils.cpp_extension as cpp
    from ortholora_kernels.backends import native_impl
    if native_impl.availability(torch.device("cpu")) is not None:
        pytest.skip("needs the built extension to stand in for the JIT result")
    real = sys.modules["ortholora_kernels._C"]
    real_import = native_impl.importlib.import_module
    calls = []

    def fake_load(**kw):
        calls.append(kw)
        return real
    monkeypatch.setattr(native_impl, "_state", {"fakes": True})
    monkeypatch.setattr(native_impl.importlib, "import_module", _missing)
    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setenv("ORTHOLORA_JIT", "1")
    monkeypatch.setenv("ORTHOLORA_JIT_DIR", str(tmp_path))
    assert native_impl.availability(torch.device("cpu")) is None
    assert native_impl.availability(torch.device("cpu")) is None   # built once
    assert len(calls) == 1
    kw = calls[0]
    assert kw["name"] == "_C" and kw["build_directory"].startswith(str(tmp_path))
    assert any(src.endswith("csrc/ortholora_cpu.cpp") for src in kw["sources"])
    assert any(src.endswith("csrc/module.cpp") for src in kw["sources"])
    assert "building it once" in capsys.readouterr().err
    monkeypatch.setattr(native_impl.importlib, "import_module", real_import)   # (patched globally)
    usable, how = ok.backends_available("cpu")["native"]
    assert usable and "JIT-built at first use" in how, how


def test_automatic_order_on_cuda_prefers_triton(monkeypatch):
    """Deliver 5: on CUDA, triton before native until native is measured faster; native
    still next (e.g. without triton), torch last; CPU keeps native first."""
    from ortholora_kernels import backends
    usable = {"native", "triton", "torch"}
    monkeypatch.setattr(backends, "availability", lambda name, device: None if name in usable else "no")
    cuda = torch.device("cuda")
    assert backends._select(None, cuda, ()) == "triton"
    usable.discard("triton")
    assert backends._select(None, cuda, ()) == "native"
    assert backends._select(None, cuda, ("native",)) == "torch"
    usable.add("triton")
    assert backends._select(None, torch.device("cpu"), ()) == "native"


# ------------------------------------------------- the GPU scripts' logic, on CPU


def _script(name, folder="scripts"):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_ortholora_{name}", os.path.join(ROOT, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@interpreter
def test_bench_correctness_check_runs_on_cpu_tensors(monkeypatch):
    """The bench's correctness gate compares on one device (the reference is returned on the
    input's device; a CUDA reference beside a CPU result raised before any row was written),
    and it fails when triton is off."""
    bench = _script("bench_project_gpu", "benchmarks")
    msg = bench.check_correctness("cpu", n=300, tasks=(3,))
    assert "triton vs reference: max rel err" in msg and "native vs reference" in msg, msg
    real = bench.ok.project

    def off(*a, **k):
        out = real(*a, **k)
        return out * (1 + 1e-3) if k.get("backend") == "triton" else out
    monkeypatch.setattr(bench.ok, "project", off)
    with pytest.raises(AssertionError, match="disagrees with the reference"):
        bench.check_correctness("cpu", n=300, names=("triton",), tasks=(3,))


class _FakeGraphs:
    """CPU stand-in for gpu_stress.CudaGraphs: a capture runs the call with the triton
    backend's capture check on and replays re-run it into the captured output."""

    device = "cpu"

    def __init__(self, monkeypatch, impl):
        self.mp, self.impl, self.capturing = monkeypatch, impl, False

    def stream(self):
        return object()

    def on(self, stream):
        import contextlib
        return contextlib.nullcontext()

    def fork(self, stream):
        pass

    join = fork

    def sync(self):
        pass

    def _captured(self, fn):
        self.capturing = True
        self.mp.setattr(self.impl, "_capturing", lambda device: True)
        try:
            return fn()
        finally:
            self.capturing = False
            self.mp.setattr(self.impl, "_capturing", lambda device: False)

    def capture(self, fn, stream):
        out = self._captured(fn)
        return (lambda: out.copy_(self._captured(fn))), out


def _refuse_first_launch_while_capturing(monkeypatch, impl, kit):
    """Each kernel specialisation's first launch outside a capture 'loads' it; a first
    launch inside one raises as CUDA does (Triton's module load on a capturing stream)."""
    loaded = set()

    class Launcher:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                key = (self.name, tuple(sorted((k, v) for k, v in kwargs.items() if not hasattr(v, "shape"))))
                if key not in loaded:
                    if kit.capturing:
                        raise RuntimeError("operation not permitted when stream is capturing")
                    loaded.add(key)
                return self.kernel[grid](*args, **kwargs)
            return launch
    for name in ("_gram_kernel", "_combine_kernel", "_reduce_solve_kernel", "_solve_vjp_kernel"):
        monkeypatch.setattr(impl, name, Launcher(name, getattr(impl, name)))
    return loaded


@interpreter
def test_stress_graph_check_warms_up_outside_the_capture(monkeypatch):
    """gpu_stress's graph check: the kernels are launched once before any capture (a
    first launch inside one is refused on a GPU), the captured calls still meet a fresh
    layout, and replays in reverse order and side by side give the reference."""
    stress = _script("gpu_stress")
    impl = _impl()
    kit = _FakeGraphs(monkeypatch, impl)
    loaded = _refuse_first_launch_while_capturing(monkeypatch, impl, kit)
    built_in_capture = []
    real_layout = impl._Layout

    def layout(*a, capturing=False, **k):
        built_in_capture.append(capturing)
        return real_layout(*a, capturing=capturing, **k)
    monkeypatch.setattr(impl, "_Layout", layout)
    stress.graphs_reverse_one("triton", 0, kit, n=240)
    assert {k[0] for k in loaded} == {"_gram_kernel", "_combine_kernel"}
    assert True in built_in_capture                      # the captured calls built their own tables
    loaded.clear()   # a fresh process: the first launch inside a capture is refused, as on a GPU
    with pytest.raises(RuntimeError, match="capturing"):
        kit.capture(lambda: ok.project(make_grads(8, 240, seed=1), [0, 9, 240], order=random_order(8, 2, seed=2),
                                       backend="triton"), None)


def test_stress_checks_record_each_failure_and_write_after_each_check(tmp_path, monkeypatch):
    """A failing check (or a fault surfacing at the synchronisation after it) is recorded
    and the next check runs; stress.json holds every record so far after each check."""
    import json
    stress = _script("gpu_stress")
    seen = []
    faults = ["an illegal memory access was encountered"]

    def synchronize():           # the GPU path synchronises after each check, inside its try
        if ctx_state["fault"]:
            ctx_state["fault"] = False
            raise RuntimeError(faults[0])
    ctx_state = {"fault": False}
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def check_async_fault(ctx):
        ctx_state["fault"] = True       # the kernel faulted; the check itself returned
        return "returned before the fault surfaced"

    def check_first(ctx):
        return "fine"

    def check_broken(ctx):
        seen.append(json.load(open(tmp_path / "stress.json"))["checks"])   # written after check_first
        raise RuntimeError("an illegal memory access was encountered")

    def check_skipped(ctx):
        raise stress.Skip("needs CUDA")

    def check_last(ctx):
        seen.append(json.load(open(tmp_path / "stress.json"))["checks"])
        return "ran after the failure"

    class Ctx:
        device = "cuda"
    records = stress.run_checks(Ctx, None, str(tmp_path), True,
                                checks=[check_first, check_broken, check_skipped, check_async_fault, check_last])
    assert [r["status"] for r in records] == ["passed", "FAILED", "skipped", "FAILED", "passed"]
    assert "illegal memory access" in records[1]["detail"] and "illegal memory access" in records[3]["detail"]
    assert [r["check"] for r in seen[0]] == ["first"]
    assert [r["check"] for r in seen[1]] == ["first", "broken", "skipped", "async_fault"]
    assert json.load(open(tmp_path / "stress.json"))["checks"] == records


STEPS = ["env", "build", "avail", "correct", "bench", "stress", "train", "tests"]


def _fake_python(tmp_path, out, stress_sleep):
    """A stand-in for the interpreter gpu_check.sh runs: it notes each call with what $OUT
    held at that moment, prints a line, fails the bench and sleeps in the stress step."""
    trace = tmp_path / "trace.txt"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
{{ echo "CALL $*" | tr '\\n' ' '; echo; cat "{out}/summary.csv"; grep -c '^output of' "{out}/gpu_check.log"; }} >> "{trace}"
echo "output of $*"
case "$*" in
    *bench_project.py*) exit 3 ;;
    *gpu_stress.py*) exec sleep {stress_sleep} ;;
esac
""")
    fake.chmod(0o755)
    return fake, trace


def _calls(trace):
    """``[(step, summary rows present, log lines present)]`` at each call of the fake."""
    text = trace.read_text().split("CALL ")[1:]
    out = []
    for block in text:
        lines = block.strip().splitlines()
        out.append((lines[0], [r.split(",")[0] for r in lines[2:-1]], int(lines[-1])))
    return out


def test_gpu_check_runs_in_order_writes_after_each_step_and_keeps_its_budget(tmp_path):
    """Steps in order of value; summary.csv/json and the log in $OUT after every step (each
    call sees the rows of all steps before it); a failing step and a step killed at the
    budget are recorded and the rest skipped, never run past it; at most 8 files."""
    import json
    out = tmp_path / "out"
    fake, trace = _fake_python(tmp_path, out, stress_sleep=60)
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OUT=str(out), PYTHON=str(fake), GPU_CHECK_BUDGET="14"))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    rows = [line.split(",") for line in (out / "summary.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == STEPS
    status = {row[0]: row[1] for row in rows}
    assert status["bench"] == "FAILED (exit 3)" and status["stress"] == "FAILED (timeout)"
    assert all(status[s] == "passed" for s in STEPS[:4]), status
    assert status["train"] == status["tests"] == "skipped (budget)"
    assert sum(int(row[2]) for row in rows) <= 14 + 6            # the kill-after grace at most
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and [s["step"] for s in summary["steps"]] == STEPS
    calls = [c for c in _calls(trace) if "-c import sys, torch" not in c[0] and "import triton" not in c[0]]
    seen = {}
    for cmd, rows_then, logged in calls:       # which step made the call, and what $OUT held then
        step = next(s for s, k in (("build", "ortholora_kernels._C"), ("avail", "backends_available"),
                                  ("correct", "--check-only"), ("bench", "bench_project.py"),
                                  ("stress", "gpu_stress.py"), ("train", "bench_train_step")) if k in cmd)
        seen[step] = (rows_then, logged)
    assert list(seen) == STEPS[1:6]
    for i, step in enumerate(STEPS[1:6], start=1):
        rows_then, logged = seen[step]
        assert rows_then == STEPS[:i], (step, rows_then)     # every earlier step already in $OUT
        assert logged >= i - 1, (step, logged)                # and its output in the log
    log = (out / "gpu_check.log").read_text()
    assert "output of benchmarks/bench_project.py --quick" in log and "===== [stress] FAILED (timeout)" in log
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


def test_gpu_check_killed_mid_step_leaves_what_ran(tmp_path):
    """A kill at any point (the device's per-command limit) leaves the summary of the steps
    that finished and the running step's output so far."""
    import json
    import signal
    import time
    out = tmp_path / "out"
    fake, trace = _fake_python(tmp_path, out, stress_sleep=120)
    proc = subprocess.Popen(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, OUT=str(out), PYTHON=str(fake)))
    try:
        deadline = time.time() + 60
        while "gpu_stress.py" not in (trace.read_text() if trace.exists() else ""):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is False
    assert [s["step"] for s in summary["steps"]] == STEPS[:5]
    assert "output of scripts/gpu_stress.py --dry-run" in (out / "gpu_check.log").read_text()


def test_automatic_choice_on_cuda_sends_no_t_past_triton_limit(monkeypatch):
    """triton on CUDA takes T <= 128 (T = 129 pads to 256: ~54 KB of spills per thread
    on sm_90): the automatic choice goes to torch past it, an explicit choice is refused."""
    from ortholora_kernels import backends
    impl = _triton_or_skip()
    monkeypatch.setattr(backends, "availability", lambda name, device: None)
    cuda = torch.device("cuda")
    assert backends.select(None, cuda, 128) == "triton"
    assert backends.select(None, cuda, 129) == "torch"
    assert backends._MAX_TASKS["cuda"]["triton"] == impl._MAX_TASKS_CUDA
    impl._check_tasks(cuda, 128)
    impl._check_tasks(torch.device("cpu"), 1000)          # the interpreter: no limit
    with pytest.raises(RuntimeError, match="at most 128 tasks"):
        impl._check_tasks(cuda, 129)
