"""The CI entry point and the test command run every stage and still fail: a failing stage
does not hide the verdicts of the later, independent ones (checked on stub stages)."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(tree: Path, script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    return subprocess.run(["bash", script], cwd=tree, env=env, capture_output=True, text=True, timeout=60)


def test_ci_run_runs_every_stage_after_a_failure_and_exits_nonzero(tmp_path):
    shutil.copytree(ROOT / ".ci", tmp_path / ".ci")
    log = tmp_path / "log"
    _script(tmp_path / "scripts/check_cuda.sh", f"echo check_cuda >> {log}; exit 3\n")
    # The test command fails too, but leaves .venv (the later stages need it).
    _script(tmp_path / "scripts/test.sh",
            f"echo tests >> {log}; mkdir -p .venv/bin; printf '#!/usr/bin/env bash\\n"
            f"echo \"python $*\" >> {log}\\n' > .venv/bin/python; chmod +x .venv/bin/python; exit 1\n")
    _script(tmp_path / "scripts/gpu_check.sh", f"echo \"gpu_check $*\" >> {log}\n")
    r = _run(tmp_path, ".ci/run")
    assert r.returncode != 0, r.stdout
    lines = log.read_text().splitlines()
    assert lines[0] == "check_cuda" and lines[1] == "tests"
    assert sum("compile_gpu.py --arch sm_90 --quick" in l for l in lines) == 2  # dev Triton and 3.6.0
    assert lines[-1] == "gpu_check --dry-run"
    assert "FAILED stage: CUDA compile" in r.stdout and "FAILED stage: tests" in r.stdout
    assert "FAILED stage: gpu_check" not in r.stdout


def test_ci_run_passes_when_every_stage_passes(tmp_path):
    shutil.copytree(ROOT / ".ci", tmp_path / ".ci")
    _script(tmp_path / "scripts/check_cuda.sh", "exit 0\n")
    _script(tmp_path / "scripts/test.sh",
            "mkdir -p .venv/bin; printf '#!/usr/bin/env bash\\nexit 0\\n' > .venv/bin/python; chmod +x .venv/bin/python\n")
    _script(tmp_path / "scripts/gpu_check.sh", "exit 0\n")
    r = _run(tmp_path, ".ci/run")
    assert r.returncode == 0, r.stdout
    assert "all stages passed" in r.stdout


def test_test_command_runs_the_interpreter_suite_after_a_cpu_failure(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/test.sh", tmp_path / "scripts/test.sh")
    log = tmp_path / "log"
    # A stub environment: `python -m pytest` fails for the CPU suite, passes for the interpreter.
    (tmp_path / "scripts/env.sh").write_text(
        f'python() {{ echo "TRITON_INTERPRET=${{TRITON_INTERPRET:-}} $*" >> {log}; '
        '[ "${TRITON_INTERPRET:-}" = 1 ]; }\n')
    r = _run(tmp_path, "scripts/test.sh")
    assert r.returncode != 0
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and "not interpreter" in lines[0] and lines[1].startswith("TRITON_INTERPRET=1 ")
    assert "FAILED: CPU suite" in r.stderr and "interpreter suite" not in r.stderr
