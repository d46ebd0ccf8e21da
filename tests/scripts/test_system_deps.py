"""scripts/system-deps puts back a policy-rc.d the host already had (and removes only its own), even when
apt-get fails. apt-get is a stand-in on PATH that records what policy was in force while it ran."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "system-deps"
TOOLS = ("bash", "sh", "mv", "rm", "chmod", "printf", "id", "cat")


def run(tmp_path: Path, apt_rc: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The script with promtool absent from PATH, so it installs; returns the result and apt-get's record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(shutil.which(tool))
    record = tmp_path / "apt.log"
    policy = tmp_path / "policy-rc.d"
    for name, body in (
        ("apt-get", f'cat "{policy}" >> "{record}"; exit {apt_rc}\n'),
        ("sudo", '"$@"\n'),
        ("redis-server", ""),
    ):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "POSTSENSE_POLICY_RC_D": str(policy), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        executable=shutil.which("bash"),
    )
    return result, record


@pytest.mark.parametrize("apt_rc", [0, 1])
def test_a_host_policy_is_restored_after_the_install(tmp_path: Path, apt_rc: int) -> None:
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# the host's own\nexit 101\n")
    os.chmod(policy, 0o750)
    result, record = run(tmp_path, apt_rc)
    assert result.returncode == apt_rc, result.stderr
    assert (
        "exit 101" in record.read_text() and "the host's own" not in record.read_text()
    )  # ours during apt-get
    assert (
        policy.read_text() == "#!/bin/sh\n# the host's own\nexit 101\n"
        and policy.stat().st_mode & 0o777 == 0o750
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("policy")) == ["policy-rc.d"]


def test_without_a_host_policy_ours_is_removed(tmp_path: Path) -> None:
    result, record = run(tmp_path, 0)
    assert result.returncode == 0, result.stderr
    assert "exit 101" in record.read_text()
    assert not (tmp_path / "policy-rc.d").exists()
