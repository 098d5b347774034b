"""deploy/: the systemd units verify (systemd-analyze, else a parse check) and reference only
variables the environment-file example defines."""
from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ["ds4tp-worker.service", "ds4tp-gateway.service"]
INSTALLED = "/opt/ds4tp/venv/bin/ds4tp"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections, cur = {}, None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"line {n}: bad section header {line!r}"
            cur = sections.setdefault(line[1:-1], {})
            continue
        assert cur is not None and "=" in line, f"line {n}: not key=value in a section: {line!r}"
        k, v = line.split("=", 1)
        cur.setdefault(k.strip(), []).append(v.strip())
    return sections


def env_example() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "ds4tp.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            assert k and "#" not in v, f"EnvironmentFile lines hold no trailing comments: {line!r}"
            out[k.strip()] = v.strip()
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_unit_structure(unit):
    u = parse_unit((DEPLOY / unit).read_text())
    svc = u["Service"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["EnvironmentFile"] == ["/etc/ds4tp/ds4tp.env"]
    assert svc["ExecStart"][0].startswith(INSTALLED + " " + unit.split("-")[1].split(".")[0])
    assert u["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    used = set(re.findall(r"\$\{(\w+)\}", svc["ExecStart"][0]))
    missing = used - set(env_example())
    assert not missing, f"{unit} uses variables the env example lacks: {missing}"


def test_env_example_has_the_distributed_and_nccl_settings():
    env = env_example()
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS4TP_MODEL", "NCCL_SOCKET_IFNAME",
              "NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "DS4TP_WORKERS"):
        assert k in env, k


def test_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not available (test_unit_structure parses the units)")
    # verify checks that ExecStart's binary exists: stand in an executable at a temp path
    fake = tmp_path / "bin" / "ds4tp"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    paths = []
    for unit in UNITS:
        p = tmp_path / unit
        p.write_text((DEPLOY / unit).read_text().replace(INSTALLED, str(fake)))
        paths.append(str(p))
    r = subprocess.run([exe, "verify", *paths], capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, out
    # and the check can fail: a misspelt directive is reported
    bad = tmp_path / "bad.service"
    bad.write_text(Path(paths[0]).read_text().replace("Restart=on-failure", "Restrt=on-failure"))
    r = subprocess.run([exe, "verify", str(bad)], capture_output=True, text=True)
    assert "Restrt" in r.stdout + r.stderr
