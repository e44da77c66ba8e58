"""`igw policy diff` / `apply` against a real redis-server and a running rate-limit service."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ext_proc import store
from igw.policy import apply as policy_apply
from igw.policy import ratelimit
from igw.policy.load import load_policy_file
from igw.procs import REPO_ROOT
from tests.helpers import ServiceFactory
from tests.policy.helpers import BASE, load
from tests.ratelimit.rls_client import RlsClient, descriptor

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"


@pytest.fixture
def client(redis_url: str):
    c = store.connect(redis_url)
    yield c
    c.close()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ratelimit"
    directory.mkdir()
    return directory


def igw(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "igw.cli", "--redis-url", redis_url, *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_apply_writes_tenants_models_and_aliases_as_ext_proc_reads_them(client, config_dir: Path) -> None:
    policy_apply.apply(load_policy_file(DEMO), client, config_dir)
    demo = store.get_tenant(client, "demo")
    assert (demo.department, demo.tier, demo.models, demo.timeout_ms, demo.status) == (
        "demo", "standard", ("*",), 60_000, "active")
    assert {m.name: m.inspect_body for m in store.list_models(client)} == {
        "demo-linear": False, "demo-logistic": True}
    assert store.list_aliases(client) == {"linear": "demo-linear", "logistic": "demo-logistic"}
    assert store.get_tenant(client, "acme").models == ("demo-*",)


def test_apply_writes_the_rate_limit_file_atomically_and_leaves_no_temporary(client, config_dir: Path) -> None:
    policy = load_policy_file(DEMO)
    policy_apply.apply(policy, client, config_dir)
    assert sorted(p.name for p in config_dir.iterdir()) == [ratelimit.FILE_NAME]
    assert (config_dir / ratelimit.FILE_NAME).read_text() == ratelimit.render_file(policy)


def test_a_second_apply_changes_nothing(client, config_dir: Path) -> None:
    policy = load_policy_file(DEMO)
    policy_apply.apply(policy, client, config_dir)
    plan = policy_apply.plan(policy, client, config_dir)
    assert plan.empty, plan.lines()


def test_diff_names_each_change(client, config_dir: Path) -> None:
    policy_apply.apply(load(BASE), client, config_dir)
    changed = BASE.replace("tier: free", "tier: standard").replace("limit: 30", "limit: 60\n    inspect_body: true")
    lines = policy_apply.plan(load(changed), client, config_dir).lines()
    (beta,) = [line for line in lines if line.startswith("~ tenant beta: ")]
    assert "tier 'free' -> 'standard'" in beta
    assert "timeout_ms '30000' -> '60000'" in beta
    assert "~ model bert: inspect_body false -> true" in lines
    assert "~ limit igw.model_bert: 30/second -> 60/second" in lines
    assert "~ limit igw.tenant_acme.model_bert: 20/second -> 40/second" in lines


def test_records_outside_the_policy_are_reported_and_kept_unless_pruned(client, config_dir: Path) -> None:
    store.register_model(client, "legacy")
    store.set_alias(client, "old", "legacy")
    store.create_tenant(client, "manual", department="x", tier="free", models="*")
    lines = policy_apply.apply(load(BASE), client, config_dir).lines()
    assert "? tenant manual: not in the policy; left as is" in lines
    assert "? model legacy: not in the policy; --prune removes it" in lines
    assert "legacy" in {m.name for m in store.list_models(client)}
    policy_apply.apply(load(BASE), client, config_dir, prune=True)
    assert "legacy" not in {m.name for m in store.list_models(client)}
    assert "old" not in store.list_aliases(client)
    assert store.get_tenant(client, "manual").id == "manual"  # tenants are never pruned


def test_a_name_the_policy_makes_a_model_stops_being_an_alias(client, config_dir: Path) -> None:
    store.register_model(client, "elsewhere")
    store.set_alias(client, "bert", "elsewhere")
    policy_apply.apply(load(BASE), client, config_dir)
    assert "bert" not in store.list_aliases(client)
    assert "bert" in {m.name for m in store.list_models(client)}


def test_apply_keeps_tenant_status_and_keys(client, config_dir: Path) -> None:
    policy_apply.apply(load(BASE), client, config_dir)
    store.suspend_tenant(client, "beta")
    key = store.issue_key(client, "beta")
    policy_apply.apply(load(BASE.replace("tier: free", "tier: standard")), client, config_dir)
    beta = store.get_tenant(client, "beta")
    assert (beta.tier, beta.status) == ("standard", "suspended")
    assert [k.key_id for k in store.list_keys(client, "beta")] == [key.key_id]


def test_a_config_the_service_would_reject_is_not_applied(client, config_dir: Path) -> None:
    (config_dir / "other.yaml").write_text("domain: igw\ndescriptors: []\n")  # a second file for domain igw
    with pytest.raises(policy_apply.ApplyError, match="duplicate domain 'igw'"):
        policy_apply.apply(load(BASE), client, config_dir)
    assert store.list_tenants(client) == []
    assert sorted(p.name for p in config_dir.iterdir()) == ["other.yaml"]


def test_merge_domains_lets_another_file_share_the_domain(client, config_dir: Path) -> None:
    (config_dir / "other.yaml").write_text("domain: igw\ndescriptors: [{key: path, rate_limit: "
                                           "{unit: second, requests_per_unit: 1}}]\n")
    plan = policy_apply.apply(load(BASE), client, config_dir, merge_domains=True)
    assert "igw.path" not in {c.key for c in plan.limit_changes}  # already live, not ours


def test_redis_down_applies_nothing(config_dir: Path) -> None:
    import redis

    from igw.procs import free_port

    dead = store.connect(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.ConnectionError):
        policy_apply.apply(load(BASE), dead, config_dir)
    assert list(config_dir.iterdir()) == []


def tenant_limit(rls: RlsClient, tenant: str) -> int:
    status = rls.call(descriptor([("tenant", tenant)], hits=0), domain="igw").statuses[0]
    return status.current_limit.requests_per_unit


def test_the_running_rate_limit_service_picks_up_an_apply_without_restart(
        services: ServiceFactory, client, config_dir: Path, redis_url: str) -> None:
    policy_apply.apply(load(BASE.replace("tier: free", "tier: free\n    limit: 9")), client, config_dir)
    service = services.ratelimit(config_dir, redis_url, "--config-poll-interval", "100ms")
    rls = RlsClient(service.grpc_target, domain="igw")
    pid = service.proc.pid
    assert tenant_limit(rls, "beta") == 9
    policy_apply.apply(load(BASE.replace("tier: free", "tier: free\n    limit: 4")), client, config_dir)
    deadline = time.monotonic() + 5
    while tenant_limit(rls, "beta") != 4:
        if time.monotonic() > deadline:
            pytest.fail("the service did not load the applied config within 5 s")
        time.sleep(0.05)
    assert service.proc.alive() and service.proc.pid == pid  # reloaded in place, not restarted
    rls.close()


def test_cli_validate_reports_errors_with_file_and_line(tmp_path: Path, redis_url: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("per_replica: 10", "per_replica: ten"))
    result = igw("policy", "validate", str(bad), redis_url=redis_url)
    assert result.returncode == 1
    assert f"{bad}:13: models.resnet.per_replica: 'ten' is not of type 'integer'" in result.stderr


def test_cli_validate_accepts_the_demo_policy(redis_url: str) -> None:
    result = igw("policy", "validate", str(DEMO), redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    assert "ok (3 tenants, 2 models, 2 aliases" in result.stdout


def test_cli_diff_then_apply_then_diff(tmp_path: Path, config_dir: Path, redis_url: str) -> None:
    args = (str(DEMO), "--rate-limit-config-dir", str(config_dir))
    first = igw("policy", "diff", *args, "--exit-code", redis_url=redis_url)
    assert first.returncode == 1
    assert "+ tenant demo: department=demo, tier=standard" in first.stdout
    assert "+ alias linear: demo-linear" in first.stdout
    assert "+ limit igw.tenant_demo: 10/second" in first.stdout
    applied = igw("policy", "apply", *args, redis_url=redis_url)
    assert applied.returncode == 0, applied.stderr
    again = igw("policy", "diff", *args, "--exit-code", redis_url=redis_url)
    assert (again.returncode, again.stdout.strip()) == (0, "no changes")


def test_a_file_of_the_directory_that_is_not_utf8_is_a_config_error_naming_it(config_dir: Path) -> None:
    from ratelimit_svc.config import ConfigError

    (config_dir / "other.yaml").write_bytes(b"domain: other\n\xff\n")
    with pytest.raises(ConfigError, match=r"^other\.yaml: not UTF-8 text \(byte 0xff at offset 14\)$"):
        policy_apply._read_dir(config_dir, None, merge_domains=False)


def test_a_directory_where_the_rate_limit_file_goes_is_refused_before_redis_is_written(
        client, config_dir: Path) -> None:
    (config_dir / ratelimit.FILE_NAME).mkdir()
    with pytest.raises(policy_apply.ApplyError, match="not a regular file"):
        policy_apply.apply(load(BASE), client, config_dir)
    assert store.list_tenants(client) == []
    assert sorted(p.name for p in config_dir.iterdir()) == [ratelimit.FILE_NAME]


def start_apply(policy_file: Path, config_dir: Path, redis_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "igw.cli", "--redis-url", redis_url, "policy", "apply",
                             str(policy_file), "--rate-limit-config-dir", str(config_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)


def wait_for_blocked_clients(admin, count: int) -> None:
    """Until `count` clients wait in a transaction that CLIENT PAUSE WRITE holds (flag b: blocked)."""
    deadline = time.monotonic() + 30
    while sum("b" in c["flags"] for c in admin.client_list()) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} clients reached EXEC within 30 s")
        time.sleep(0.01)


def test_a_rename_that_fails_after_the_redis_commit_reports_redis_applied_and_the_file_not(
        own_redis, config_dir: Path, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(BASE)
    admin = store.connect(own_redis.url)
    admin.client_pause(60_000, all=False)  # writes (the EXEC) wait; the plan's reads and WATCH go through
    try:
        proc = start_apply(policy_file, config_dir, own_redis.url)
        wait_for_blocked_clients(admin, 1)
        (config_dir / ratelimit.FILE_NAME).mkdir()  # in the way of the rename, even for root
    finally:
        admin.client_unpause()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert err.startswith("igw: error: partly applied: Redis is up to date (5 record changes committed)")
    assert out.startswith("applied (Redis):\n  + tenant acme: ") and "not applied (rate-limit config):" in out
    assert f"cannot replace {config_dir / ratelimit.FILE_NAME}: Is a directory" in err
    assert f"re-run `igw policy apply {policy_file} --rate-limit-config-dir {config_dir}`" in err
    assert {t.id for t in store.list_tenants(admin)} == {"acme", "beta"}
    assert sorted(p.name for p in config_dir.iterdir()) == [ratelimit.FILE_NAME]
    assert (config_dir / ratelimit.FILE_NAME).is_dir()
    admin.close()


def test_an_exec_without_answer_is_reported_as_unknown_and_the_file_is_left_alone(
        own_redis, config_dir: Path, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(BASE)
    admin = store.connect(own_redis.url)
    admin.client_pause(60_000, all=False)  # the EXEC waits past the CLI's socket timeout
    try:
        result = igw("policy", "apply", str(policy_file), "--rate-limit-config-dir", str(config_dir),
                     redis_url=own_redis.url)
    finally:
        admin.client_unpause()
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("igw: error: outcome unknown: the Redis transaction was sent but its outcome "
                                    "is unknown (TimeoutError")
    assert f"Run `igw policy diff {policy_file} --rate-limit-config-dir {config_dir}`" in result.stderr
    assert "nothing applied" not in result.stderr
    assert list(config_dir.iterdir()) == []
    admin.close()


def test_of_two_concurrent_applies_the_second_to_commit_is_refused_and_changes_nothing(
        own_redis, config_dir: Path, tmp_path: Path) -> None:
    texts = {"free": BASE, "standard": BASE.replace("tier: free", "tier: standard\n    limit: 7")}
    files = {}
    for name, text in texts.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(text)
    admin = store.connect(own_redis.url)
    admin.client_pause(60_000, all=False)  # both read and WATCH, then both wait at EXEC
    try:
        procs = {name: start_apply(path, config_dir, own_redis.url) for name, path in files.items()}
        wait_for_blocked_clients(admin, 2)
    finally:
        admin.client_unpause()
    results = {name: (p.wait(timeout=60), *p.communicate()) for name, p in procs.items()}
    (winner,) = [name for name, (code, _, _) in results.items() if code == 0]
    (loser,) = [name for name, (code, _, _) in results.items() if code != 0]
    assert results[loser][2].startswith("igw: error: nothing applied: Redis changed while this apply ran")
    assert store.get_tenant(admin, "beta").tier == winner
    assert (config_dir / ratelimit.FILE_NAME).read_text() == ratelimit.render_file(load_policy_file(files[winner]))
    assert sorted(p.name for p in config_dir.iterdir()) == [ratelimit.FILE_NAME]
    admin.close()
