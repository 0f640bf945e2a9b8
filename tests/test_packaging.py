"""``pip install .`` gives a wheel that works outside the repository, zoo weights included."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {result.stderr[-500:]}")
    return next(out.glob("depass_lens-*.whl"))


def test_wheel_ships_the_zoo(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("ioi", "induction", "recall", "bilingual"):
        assert f"depass_lens/zoo/weights/{model}.safetensors" in names
        assert f"depass_lens/zoo/weights/{model}.ablation.json" in names
        assert f"depass_lens/zoo/cards/{model}.md" in names
    assert not any(name.startswith("tests/") for name in names)


def test_wheel_works_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    check = f"assert dp.__file__.startswith({str(target)!r}), dp.__file__"
    code = "; ".join(
        [
            "import depass_lens as dp, depass_lens.zoo as zoo",
            "m = zoo.load('ioi')",
            "prompt = 'When Mary and John went to the store , John gave a drink to'",
            "a = dp.DePass(m).attribute(prompt, dp.LogitDiff('Mary', 'John'), dp.Heads())",
            check,
            "print(a.top(1))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "L1H0" in result.stdout
