"""`igw tenants|keys|models`: exit codes 0 (ok), 2 (bad arguments), 1 (other failures), and --output json."""

from __future__ import annotations

import json
import subprocess

import pytest

from igw.procs import VENV_BIN, free_port
from tests.ext_proc.helpers import ExtProcClient, allowed_headers, denial, request_headers
from tests.helpers import ServiceFactory


def igw(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "igw"), "--redis-url", redis_url, *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_operator_flow_issues_a_key_that_the_processor_accepts(redis_url: str, services: ServiceFactory) -> None:
    assert igw(redis_url, "models", "register", "llama-3-8b").returncode == 0
    assert igw(redis_url, "models", "alias", "llama", "llama-3-8b").returncode == 0
    created = igw(redis_url, "tenants", "create", "acme", "--department", "research", "--tier", "standard",
                  "--models", "llama-*", "--output", "json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["models"] == ["llama-*"]
    issued = igw(redis_url, "keys", "issue", "acme", "--output", "json")
    assert issued.returncode == 0, issued.stderr
    document = json.loads(issued.stdout)
    assert document["tenant"] == "acme" and document["key"].startswith("igw_")

    service = services.start_module("ext_proc", "--redis-url", redis_url)
    client = ExtProcClient(service.grpc_target)
    try:
        answer = client.one(request_headers("/v2/models/llama/infer", key=document["key"]))
        assert allowed_headers(answer).set["x-igw-model"] == "llama-3-8b"
        revoked = igw(redis_url, "keys", "revoke", document["key_id"], "--output", "json")
        assert revoked.returncode == 0 and json.loads(revoked.stdout)["state"] == "revoked"
        assert denial(client.one(request_headers(key=document["key"]))).status == 401
    finally:
        client.close()


def test_listing_never_shows_keys(redis_url: str) -> None:
    igw(redis_url, "tenants", "create", "acme", "--department", "r", "--tier", "free", "--models", "*")
    key = json.loads(igw(redis_url, "keys", "issue", "acme", "--output", "json").stdout)["key"]
    listed = igw(redis_url, "keys", "list", "--output", "json")
    assert listed.returncode == 0 and key not in listed.stdout
    assert [k["state"] for k in json.loads(listed.stdout)] == ["active"]


def test_invalid_tenant_id_exits_2_naming_the_problem(redis_url: str) -> None:
    result = igw(redis_url, "tenants", "create", "Bad Id!", "--department", "d", "--tier", "free", "--models", "*")
    assert result.returncode == 2
    assert "invalid tenant id 'Bad Id!'" in result.stderr


def test_missing_required_flag_exits_2(redis_url: str) -> None:
    result = igw(redis_url, "tenants", "create", "acme", "--tier", "free", "--models", "*")
    assert result.returncode == 2 and "--department" in result.stderr


def test_unknown_tenant_exits_1(redis_url: str) -> None:
    result = igw(redis_url, "keys", "issue", "ghost")
    assert result.returncode == 1
    assert result.stderr.strip() == "igw: error: tenant 'ghost' does not exist"


def test_duplicate_tenant_exits_1(redis_url: str) -> None:
    args = ("tenants", "create", "acme", "--department", "d", "--tier", "free", "--models", "*")
    assert igw(redis_url, *args).returncode == 0
    result = igw(redis_url, *args)
    assert result.returncode == 1 and "already exists" in result.stderr


def test_unreachable_redis_exits_1_with_one_line() -> None:
    result = igw("redis://127.0.0.1:1/0", "tenants", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("igw: error: cannot use Redis at redis://127.0.0.1:1/0")
    assert len(result.stderr.strip().splitlines()) == 1


def test_tenant_update_changes_only_the_given_fields(redis_url: str) -> None:
    igw(redis_url, "tenants", "create", "acme", "--department", "r", "--tier", "free", "--models", "llama-*")
    igw(redis_url, "tenants", "suspend", "acme")
    updated = igw(redis_url, "tenants", "update", "acme", "--models", "mistral-*,llama-3-8b", "--priority", "7",
                  "--output", "json")
    assert updated.returncode == 0, updated.stderr
    document = json.loads(updated.stdout)
    assert document["models"] == ["mistral-*", "llama-3-8b"] and document["priority"] == 7
    assert document["status"] == "suspended" and document["department"] == "r"


def test_tenant_update_without_fields_exits_1_naming_the_problem(redis_url: str) -> None:
    igw(redis_url, "tenants", "create", "acme", "--department", "r", "--tier", "free", "--models", "*")
    result = igw(redis_url, "tenants", "update", "acme")
    assert result.returncode == 1 and "nothing to update" in result.stderr


def test_tenant_update_of_an_unknown_tenant_exits_1(redis_url: str) -> None:
    result = igw(redis_url, "tenants", "update", "ghost", "--priority", "1")
    assert result.returncode == 1 and "tenant 'ghost' does not exist" in result.stderr


def test_tenant_update_with_empty_models_exits_2(redis_url: str) -> None:
    result = igw(redis_url, "tenants", "update", "acme", "--models", " , ")
    assert result.returncode == 2 and "--models needs at least one model" in result.stderr


def test_model_remove_unregisters_the_model(redis_url: str) -> None:
    igw(redis_url, "models", "register", "llama-3-8b")
    removed = igw(redis_url, "models", "remove", "llama-3-8b", "--output", "json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == {"model": "llama-3-8b", "removed": True}
    assert json.loads(igw(redis_url, "models", "list", "--output", "json").stdout)["models"] == []


def test_removing_an_aliased_model_exits_1_naming_the_aliases_and_keeps_the_model(redis_url: str) -> None:
    igw(redis_url, "models", "register", "llama-3-8b")
    igw(redis_url, "models", "alias", "llama", "llama-3-8b")
    igw(redis_url, "models", "alias", "default", "llama-3-8b")
    result = igw(redis_url, "models", "remove", "llama-3-8b")
    assert result.returncode == 1
    assert "model 'llama-3-8b' still has aliases (default, llama)" in result.stderr
    listed = json.loads(igw(redis_url, "models", "list", "--output", "json").stdout)
    assert [m["name"] for m in listed["models"]] == ["llama-3-8b"]
    assert listed["aliases"] == {"default": "llama-3-8b", "llama": "llama-3-8b"}


def test_removing_an_unknown_model_exits_1(redis_url: str) -> None:
    result = igw(redis_url, "models", "remove", "ghost")
    assert result.returncode == 1 and "model 'ghost' is not registered" in result.stderr


def test_alias_to_an_unknown_model_exits_1(redis_url: str) -> None:
    result = igw(redis_url, "models", "alias", "llama", "ghost")
    assert result.returncode == 1 and "model 'ghost' is not registered" in result.stderr
    assert json.loads(igw(redis_url, "models", "list", "--output", "json").stdout)["aliases"] == {}


def test_an_alias_cannot_take_a_registered_model_name(redis_url: str) -> None:
    igw(redis_url, "models", "register", "llama-3-8b")
    igw(redis_url, "models", "register", "mistral")
    result = igw(redis_url, "models", "alias", "mistral", "llama-3-8b")
    assert result.returncode == 1 and "'mistral' is a registered model" in result.stderr


def tenant_ids(redis_url: str) -> list[str]:
    return [t["id"] for t in json.loads(igw(redis_url, "tenants", "list", "--output", "json").stdout)]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--timeout", "1200h", "is more than 4294967295ms"),
    ("--timeout", "0.1ms", "is under 1ms"),
    ("--timeout", "9" * 400, "too large"),
    ("--max-body-bytes", "4294967296", "4294967296 is more than 4294967295"),
    ("--priority", "1001", "1001 is more than 1000"),
], ids=["timeout past what Envoy reads", "timeout under a millisecond", "endless timeout", "body limit",
        "priority"])
def test_a_tenant_value_outside_the_policy_bounds_exits_2_and_creates_nothing(
        redis_url: str, flag: str, value: str, message: str) -> None:
    result = igw(redis_url, "tenants", "create", "acme", "--department", "d", "--tier", "free", "--models", "*",
                 flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {flag}: " in result.stderr and message in result.stderr
    assert tenant_ids(redis_url) == []


def test_a_tenant_update_outside_the_bounds_keeps_the_stored_value(redis_url: str) -> None:
    igw(redis_url, "tenants", "create", "acme", "--department", "d", "--tier", "free", "--models", "*")
    result = igw(redis_url, "tenants", "update", "acme", "--priority", "99999999999999999999")
    assert result.returncode == 2 and "argument --priority" in result.stderr
    shown = json.loads(igw(redis_url, "tenants", "show", "acme", "--output", "json").stdout)
    assert shown["priority"] == 0


def test_a_key_lifetime_beyond_a_century_exits_2_and_issues_no_key(redis_url: str) -> None:
    igw(redis_url, "tenants", "create", "acme", "--department", "d", "--tier", "free", "--models", "*")
    result = igw(redis_url, "keys", "issue", "acme", "--expires-in", "900000h")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --expires-in: lifetime '900000h' is more than 100 years" in result.stderr
    assert json.loads(igw(redis_url, "keys", "list", "--output", "json").stdout) == []


def test_an_empty_key_secret_exits_2_and_issues_no_key(redis_url: str) -> None:
    igw(redis_url, "tenants", "create", "acme", "--department", "d", "--tier", "free", "--models", "*")
    result = igw(redis_url, "keys", "issue", "acme", "--key-secret", "")
    assert result.returncode == 2 and "argument --key-secret: key secret must not be empty" in result.stderr
    assert json.loads(igw(redis_url, "keys", "list", "--output", "json").stdout) == []


def test_listing_keys_survives_an_expiry_no_date_can_show(redis_url: str) -> None:
    from ext_proc import store

    igw(redis_url, "tenants", "create", "acme", "--department", "d", "--tier", "free", "--models", "*")
    issued = json.loads(igw(redis_url, "keys", "issue", "acme", "--output", "json").stdout)
    client = store.connect(redis_url)
    digest = client.get(store.api_key_id_key(issued["key_id"]))
    client.hset(store.api_key_key(digest), "expires_at", "1e30")  # as an older igw wrote for --expires-in 1e21h
    client.close()
    listed = igw(redis_url, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"{issued['key_id']}  tenant=acme" in listed.stdout and "expires=1e+30" in listed.stdout


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    result = igw(f"redis://ops:s3cret@127.0.0.1:{free_port()}/0", "tenants", "list")
    assert result.returncode == 1 and "cannot use Redis at redis://ops:***@127.0.0.1:" in result.stderr
    assert "s3cret" not in result.stderr


def test_revoking_an_empty_key_exits_2_naming_the_flag(redis_url: str) -> None:
    result = igw(redis_url, "keys", "revoke", "--key", "")
    assert result.returncode == 2 and "argument --key: key must not be empty" in result.stderr


def test_revoking_an_unknown_key_says_no_key_matches_without_echoing_it(redis_url: str) -> None:
    result = igw(redis_url, "keys", "revoke", "--key", "garbage-3f9a")
    assert result.returncode == 1
    assert "no API key matches the key given" in result.stderr and "garbage-3f9a" not in result.stderr
