"""tests/wgmma_smoke.py (make gpu's first contact with the Hopper mainloops) on the CPU: its
snippets run against the references (device 'cpu'), so a typo in them cannot cost a GPU session,
and without a GPU it writes an empty environment file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import wgmma_smoke  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "python"), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("var", [*sorted(wgmma_smoke.CASES), *sorted(wgmma_smoke.AB_CASES), "PDL"])
def test_snippets_run(var):
    code = (wgmma_smoke.PDL_CASE.replace('"cuda"', '"cpu"') if var == "PDL"
            else wgmma_smoke.AB_CASES[var][1] if var in wgmma_smoke.AB_CASES else wgmma_smoke.CASES[var])
    code = code.replace('device="cuda"', 'device="cpu"').replace("torch.cuda.synchronize()", "")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_without_gpu_writes_an_empty_env_file(tmp_path):
    from qwen3x.testing import wgmma_available  # noqa: PLC0415

    if wgmma_available():
        pytest.skip("a Hopper GPU is here: the smoke run is the real one")
    env_file = tmp_path / "mainloop.env"
    r = subprocess.run([sys.executable, str(HERE / "wgmma_smoke.py"), str(env_file)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "mma.sync mainloops are the defaults" in r.stdout
    assert env_file.read_text() == ""


def _smoke(monkeypatch, tmp_path, capsys, cases, ab_cases, pdl_case) -> tuple[str, str]:
    """wgmma_smoke.main() as on a Hopper GPU, with these snippets: (what it printed, the env file)."""
    import qwen3x.testing

    monkeypatch.setattr(qwen3x.testing, "wgmma_available", lambda: True)
    monkeypatch.setattr(wgmma_smoke, "TIMEOUT_S", 5)
    monkeypatch.setattr(wgmma_smoke, "CASES", cases)
    monkeypatch.setattr(wgmma_smoke, "AB_CASES", ab_cases)
    monkeypatch.setattr(wgmma_smoke, "PDL_CASE", pdl_case)
    env_file = tmp_path / "mainloop.env"
    monkeypatch.setattr(sys, "argv", ["wgmma_smoke.py", str(env_file)])
    assert wgmma_smoke.main() == 0
    return capsys.readouterr().out, env_file.read_text()


def test_failures_are_switched_off_and_logged(monkeypatch, tmp_path, capsys):
    """A failing family (an error message, a crash with no output, a hang) lands in the env file
    as mma_sync with its stderr logged; a passing one does not."""
    printed, env = _smoke(monkeypatch, tmp_path, capsys, cases={
        "A_MAINLOOP": "import sys; sys.stderr.write('x\\nRuntimeError: CUDA error: an illegal instruction\\n"
                      "CUDA kernel errors might be reported asynchronously\\n'); sys.exit(1)",
        "B_MAINLOOP": "import os, signal; os.kill(os.getpid(), signal.SIGILL)",
        "C_MAINLOOP": "import time; time.sleep(60)",
        "D_MAINLOOP": "pass",
    }, ab_cases={
        "X_AB": ("1", "import time; time.sleep(60)"),
        "Y_AB": ("on", "pass"),
        "Z_AB": ("2", "raise SystemExit('the overlapped loop changed the answer')"),
    }, pdl_case="raise SystemExit('PDL changed the answer')")
    assert "A_MAINLOOP: FAILED, exit 1: RuntimeError: CUDA error: an illegal instruction" in printed
    assert "B_MAINLOOP: FAILED, exit -4" in printed and "C_MAINLOOP: FAILED, timed out" in printed
    assert "D_MAINLOOP: ok" in printed
    assert "D_MAINLOOP without the proxy fence (informational): ok" in printed
    assert "A_MAINLOOP without" not in printed  # a family already switched off is not rerun
    assert "PDL smoke (decode chains, eager and graphed, against QWEN3X_PDL=0): FAILED" in printed
    assert "X_AB=1 (an A/B candidate): FAILED, timed out" in printed and "Y_AB=on (an A/B candidate): ok" in printed
    assert "Z_AB=2 (an A/B candidate): FAILED, exit 1: the overlapped loop changed the answer" in printed
    assert env.split() == ["A_MAINLOOP=mma_sync", "B_MAINLOOP=mma_sync", "C_MAINLOOP=mma_sync",
                           "QWEN3X_SMOKE_FAILED=X_AB,Z_AB", "QWEN3X_PDL=0"]
    assert "changed the answer" in (tmp_path / "wgmma_smoke_Z_AB.log").read_text()
    assert "illegal instruction" in (tmp_path / "wgmma_smoke_A_MAINLOOP.log").read_text()


# ---- tests/error_path_probe.py: its calls raise on the CPU too (the references check their
# arguments), and it tells a raised error from a killed process ----------------------------------
import error_path_probe  # noqa: E402


@pytest.mark.parametrize("name", sorted(set(error_path_probe.CASES) - {"qwen3x_text"}))  # (a CPU weight for a
def test_error_probe_cases_raise(monkeypatch, name):  # CUDA input: all on the CPU it is a valid call)
    monkeypatch.setattr(os, "environ", ENV)
    verdict = error_path_probe._run(error_path_probe.CASES[name].replace("'cuda'", "'cpu'"))
    assert verdict.startswith(("exit 0: RuntimeError: ", "exit 0: ValueError: ")), verdict  # (the references')


def test_error_probe_reports_a_crash(monkeypatch):
    monkeypatch.setattr(os, "environ", ENV)
    assert error_path_probe._run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)").startswith("CRASHED (signal 11)")


def _attention_smoke(monkeypatch, tmp_path, capsys, family="pass", overlap="pass", cluster="pass", pdl="pass"):
    """_smoke with the attention family, the overlapped loop, the cluster combine and the PDL case
    given (a MoE family that passes)."""
    return _smoke(monkeypatch, tmp_path, capsys,
                  cases={"QWEN3X_ATTENTION_MAINLOOP": family, "QWEN3X_MOE_MAINLOOP": "pass"},
                  ab_cases={"QWEN3X_ATTENTION_OVERLAP": ("1", overlap), "QWEN3X_ATTENTION_COMBINE": ("cluster", cluster)},
                  pdl_case=pdl)


def test_a_failed_attention_family_fails_its_overlapped_loop_but_not_the_cluster_combine(monkeypatch, tmp_path,
                                                                                         capsys):
    """The overlapped loop lives inside the attention wgmma mainloop: when that family failed it is
    not run and counts as failed with it (and the serial loop is pinned, as for any failed
    candidate the default runs); the cluster combine (a decode path) still gets its run."""
    printed, env = _attention_smoke(monkeypatch, tmp_path, capsys, family="raise SystemExit('wrong')")
    assert "QWEN3X_ATTENTION_OVERLAP=1 (an A/B candidate): not run" in printed
    assert "QWEN3X_ATTENTION_COMBINE=cluster (an A/B candidate): ok" in printed
    assert env.split() == ["QWEN3X_ATTENTION_MAINLOOP=mma_sync", "QWEN3X_SMOKE_FAILED=QWEN3X_ATTENTION_OVERLAP",
                           "QWEN3X_ATTENTION_OVERLAP=0"]


@pytest.mark.parametrize("failing,pinned", [("overlap", "QWEN3X_ATTENTION_OVERLAP=0"),
                                            ("cluster", "QWEN3X_ATTENTION_COMBINE=l2")])
def test_a_failed_candidate_the_default_runs_is_pinned_off(monkeypatch, tmp_path, capsys, failing, pinned):
    """The defaults run both candidates (the overlapped Hopper loop; the cluster merge at batch-1
    decode): when one fails, the later steps must not run it by default either, nor the PDL smoke
    run right after it (its decode attention would run the failed merge)."""
    var, value = pinned.split("=")
    printed, env = _attention_smoke(monkeypatch, tmp_path, capsys, **{failing: "raise SystemExit('wrong')"},
                                    pdl=f"import os; assert os.environ.get('{var}') == '{value}'")
    assert f"{var}={AB_VALUES[var]} (an A/B candidate): FAILED" in printed
    assert "PDL smoke (decode chains, eager and graphed, against QWEN3X_PDL=0): ok" in printed
    assert env.split() == [f"QWEN3X_SMOKE_FAILED={var}", pinned]


AB_VALUES = {"QWEN3X_ATTENTION_OVERLAP": "1", "QWEN3X_ATTENTION_COMBINE": "cluster"}


def test_smoke_failed_names_only_the_listed_settings(monkeypatch):
    from qwen3x.testing import smoke_failed  # noqa: PLC0415

    monkeypatch.delenv("QWEN3X_SMOKE_FAILED", raising=False)
    assert smoke_failed("QWEN3X_ATTENTION_OVERLAP") is None
    monkeypatch.setenv("QWEN3X_SMOKE_FAILED", "QWEN3X_ATTENTION_COMBINE")
    assert smoke_failed("QWEN3X_ATTENTION_OVERLAP") is None
    assert "QWEN3X_ATTENTION_COMBINE: FAILED in the smoke run" in smoke_failed("QWEN3X_ATTENTION_COMBINE")


# ---- tests/ampere_check.py (make gpu-ampere): it refuses to let its tests run another build ------
import ampere_check  # noqa: E402


def test_ampere_check_refuses_another_copy_or_a_hopper_build(tmp_path):
    from qwen3x import _library  # noqa: PLC0415

    problems = ampere_check.check(tmp_path)  # qwen3x imports from this tree, not from tmp_path
    assert any("not from" in p for p in problems), problems
    if _library._C is None:
        assert any("did not load" in p for p in problems), problems
    elif "sm_90a" in _library._C.build_info()["archs"]:  # this tree's build (CI's: sm_80 and sm_90a)
        assert any("arch-specific" in p for p in problems), problems
