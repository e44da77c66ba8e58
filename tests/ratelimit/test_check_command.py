"""`igw ratelimit check DIR`: what an operator sees of a config directory before the service loads it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from igw.procs import VENV_BIN

ADAPTIVE = """domain: d
descriptors:
  - key: tenant
    value: acme
    rate_limit: {unit: minute, requests_per_unit: 100}
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 15, share: 2, min: 5, max: 90}
  - key: model
    value: bert
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 30, algorithm: gcra}
"""


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "igw"), "ratelimit", "check", *args],
                          capture_output=True, text=True, timeout=60)


def test_each_limit_is_listed_under_its_stats_key(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(ADAPTIVE)
    proc = check(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "d.tenant_acme: 100/minute\n" in proc.stdout
    assert proc.stdout.endswith("OK: 1 file(s), 1 domain(s), 3 limit(s)\n")


def test_an_adaptive_limit_shows_its_per_replica_rate_share_and_bounds(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(ADAPTIVE)
    assert "d.tenant_acme.model: 15/second per ready replica of <model>, share 2, min 5, max 90\n" in check(
        str(tmp_path)).stdout


def test_the_algorithm_and_shadow_mode_are_shown(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(ADAPTIVE)
    assert "d.model_bert: 30/second (gcra) shadow\n" in check(str(tmp_path)).stdout


def test_json_output_maps_stats_keys_to_limits(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(ADAPTIVE)
    out = json.loads(check(str(tmp_path), "--output", "json").stdout)
    assert out["limits"]["d.tenant_acme"] == "100/minute"
    assert [Path(f).name for f in out["files"]] == ["d.yaml"]


def test_a_bad_config_exits_1_naming_file_line_and_problem(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, "
                                     "requests_per_unit: 1}\n")
    proc = check(str(tmp_path))
    assert proc.returncode == 1
    assert "d.yaml:4: d.k: invalid rate limit unit 'fortnight'" in proc.stderr


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    proc = check(str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert f"config directory '{tmp_path / 'nope'}' does not exist" in proc.stderr


def test_a_file_given_as_the_directory_is_named_as_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(ADAPTIVE)
    proc = check(str(tmp_path / "d.yaml"))
    assert proc.returncode == 1
    assert proc.stderr == f"igw: error: config directory '{tmp_path / 'd.yaml'}' is not a directory\n"


def test_an_empty_directory_argument_exits_2_instead_of_checking_the_current_directory(tmp_path: Path) -> None:
    proc = subprocess.run([str(VENV_BIN / "igw"), "ratelimit", "check", ""], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "argument config_dir: empty path" in proc.stderr
