"""User mistakes get one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NODEMESH = str(Path(sys.executable).with_name("nodemesh"))


def nodemesh(*args: str, env: dict[str, str] | None = None,
             user: int | None = None) -> subprocess.CompletedProcess[str]:
    kw = {}
    if user is not None:
        def drop() -> None:
            os.setgid(user)
            os.setuid(user)
        kw["preexec_fn"] = drop
    return subprocess.run([NODEMESH, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False, **kw)


def one_line_error(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("cmd", ["agent", "status", "workloads", "connections", "check-config",
                                 "uninstall", "demo"])
def test_every_command_has_help(cmd: str) -> None:
    res = nodemesh(cmd, "--help")
    assert res.returncode == 0 and "usage: nodemesh" in res.stdout


def test_no_command_prints_help() -> None:
    res = nodemesh()
    assert res.returncode == 2 and "examples:" in res.stdout


def test_status_without_agent(tmp_path: Path) -> None:
    res = nodemesh("status", "--instance", "no-such-instance")
    one_line_error(res, "no agent admin socket")


def test_invalid_instance_name() -> None:
    one_line_error(nodemesh("status", "--instance", "../etc"), "not valid")


def test_check_config_reports_each_problem(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text("kind: Namespace\nmetadata: {name: shop}\n")
    (tmp_path / "bad.yaml").write_text("kind: [\n")
    res = nodemesh("check-config", str(tmp_path))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 1 and "bad.yaml" in errors[0]
    assert "1 namespaces" in res.stdout
    (tmp_path / "bad.yaml").unlink()
    assert nodemesh("check-config", str(tmp_path)).returncode == 0


def test_agent_with_missing_config_dir(tmp_path: Path) -> None:
    res = nodemesh("agent", "--config-dir", str(tmp_path / "nope"), "--cgroup-root", "/nonexistent")
    one_line_error(res, "config directory")


@pytest.mark.root
def test_agent_without_root(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    probe = subprocess.run([sys.executable, "-c", "import nodemesh"], capture_output=True,
                           preexec_fn=lambda: os.setuid(65534), check=False)
    if probe.returncode != 0:
        pytest.skip("the checkout is not readable by 'nobody', so it cannot run unprivileged")
    res = nodemesh("agent", "--config-dir", str(tmp_path), "--cgroup-root", "/tmp", user=65534)
    one_line_error(res, "must run as root")


@pytest.mark.root
def test_agent_without_bcc(tmp_path: Path) -> None:
    """Stand-in for a machine without python3-bpfcc: a `bcc` package on the
    path whose import fails exactly as a missing module does."""
    fake = tmp_path / "fakebcc" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'bcc'\")\n")
    res = nodemesh("agent", "--config-dir", str(tmp_path), "--cgroup-root", "/tmp",
                   env={"PYTHONPATH": str(fake.parent)})
    one_line_error(res, "python3-bpfcc")


@pytest.mark.root
def test_agent_without_kernel_headers(tmp_path: Path) -> None:
    res = nodemesh("agent", "--config-dir", str(tmp_path), "--cgroup-root", "/tmp",
                   env={"BCC_KERNEL_SOURCE": str(tmp_path / "no-headers")})
    one_line_error(res, "kernel headers not found")


@pytest.mark.root
def test_agent_refuses_the_machines_root_cgroup(tmp_path: Path) -> None:
    from agent.cgroupfs import cgroup2_mount

    res = nodemesh("agent", "--config-dir", str(tmp_path), "--cgroup-root", str(cgroup2_mount()))
    one_line_error(res, "refusing to attach to the machine's root cgroup")


@pytest.mark.root
def test_agent_rejects_a_cgroup_root_outside_cgroup2(tmp_path: Path) -> None:
    res = nodemesh("agent", "--config-dir", str(tmp_path), "--cgroup-root", str(tmp_path))
    one_line_error(res, "not inside the cgroup2 mount")
