"""tools/install_detectron2.py's installer commands: uv first where scripts/env.sh provides it
(CMRCNN_UV), pip wherever uv fails or is not given. Commands are recorded, nothing installs."""

import importlib.util
import os
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location(
    "install_detectron2_cmds", os.path.join(ROOT, "tools", "install_detectron2.py")
)
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


class _Calls(list):
    """The recorded commands, with ``rc["uv"]``: the exit code the fake uv returns."""


@pytest.fixture
def calls(monkeypatch):
    """Records each command instead of running it; pip always succeeds."""
    recorded = _Calls()
    recorded_rc = {"uv": 0}

    def call(cmd):
        recorded.append(cmd)
        return recorded_rc["uv"]

    def check_call(cmd):
        recorded.append(cmd)
        return 0

    monkeypatch.setattr(installer.subprocess, "call", call)
    monkeypatch.setattr(installer.subprocess, "check_call", check_call)
    recorded.rc = recorded_rc
    return recorded


def _pip_cmd(*args):
    return [sys.executable, "-m", "pip", *args]


def test_without_uv_pip_installs(monkeypatch, calls):
    monkeypatch.delenv("CMRCNN_UV", raising=False)
    installer._pip("install", "--no-build-isolation", "/src/d2")
    assert calls == [_pip_cmd("install", "--no-build-isolation", "/src/d2")]


def test_uv_installs_into_this_python(monkeypatch, calls):
    monkeypatch.setenv("CMRCNN_UV", "/venv/bin/uv")
    installer._pip("install", "--no-build-isolation", "/src/d2")
    assert calls == [
        ["/venv/bin/uv", "pip", "install", "--compile-bytecode", "--python", sys.executable]
        + ["--no-build-isolation", "/src/d2"]
    ]


def test_pip_takes_over_where_uv_fails(monkeypatch, calls):
    monkeypatch.setenv("CMRCNN_UV", "/venv/bin/uv")
    calls.rc["uv"] = 2
    installer._pip("install", "/wheels/detectron2.whl")
    assert calls[0][:3] == ["/venv/bin/uv", "pip", "install"]
    assert calls[1:] == [_pip_cmd("install", "/wheels/detectron2.whl")]


@pytest.mark.parametrize(
    "args",
    [
        ("download", "--no-deps", "-d", "/tmp/x", "pb1-detectron2==0.6"),
        ("uninstall", "-y", "pb1-detectron2"),
        ("install", "--upgrade", "pip", "setuptools>=77,<81"),
    ],
)
def test_other_pip_commands_stay_with_pip(monkeypatch, calls, args):
    monkeypatch.setenv("CMRCNN_UV", "/venv/bin/uv")
    installer._pip(*args)
    assert calls == [_pip_cmd(*args)]
