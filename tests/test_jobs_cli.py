"""How jobs end (mpformer_ray.cli): bad input is one ``error:`` line and status 2, a bug in our code
its traceback and status 1, Ctrl-C status 130. Before, the inference jobs caught every ValueError,
so a bug read as bad input."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpformer_ray.cli import job
from mpformer_ray.config import ConfigError
from mpformer_ray.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))


def _job_module(name: str):
    """jobs/NAME.py, loaded by path (a module name could be taken)."""
    spec = importlib.util.spec_from_file_location(f"cli_job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_one_error_line_and_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(tmp_path / "no-such-run"),
                           "--device", "cpu"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert str(tmp_path / "no-such-run") in proc.stderr


def test_a_bug_inside_a_job_is_its_traceback_and_status_1(tmp_path, monkeypatch, capsys):
    evaluate = _job_module("evaluate")

    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr("mpformer_ray.predict.load_for_inference", broken)
    assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.rstrip().endswith("ValueError: a bug, not bad input")


@pytest.mark.parametrize("error", [ConfigError("data.train: no such split"), UserError("data.train: no such split")])
def test_a_user_error_is_status_2_without_a_traceback(error, capsys):
    def main(argv):
        raise error

    assert job(main)([]) == 2
    assert capsys.readouterr().err == "error: data.train: no such split\n"


@pytest.mark.parametrize("error", [ValueError("bad shape"), TypeError("not callable"), KeyError("loss"),
                                   RuntimeError("CUDA out of memory")])
def test_any_other_error_is_status_1_with_its_traceback(error, capsys):
    def main(argv):
        raise error

    assert job(main)([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and f"{type(error).__name__}: " in err
    assert "error: " not in err


def test_ctrl_c_is_status_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    assert job(main)([]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_what_main_returns_and_argparse_exits_pass_through():
    assert job(lambda argv: 0)([]) == 0
    assert job(lambda argv: 2)([]) == 2
    with pytest.raises(SystemExit):  # argparse's own usage error (status 2) and --help (0)
        job(lambda argv: sys.exit(2))([])


@pytest.mark.parametrize("name", JOBS)
def test_every_job_goes_through_the_helper(name):
    main = _job_module(name).main
    assert main.__code__ is job(main.__wrapped__).__code__, f"jobs/{name}.py: main is not decorated with cli.job"
