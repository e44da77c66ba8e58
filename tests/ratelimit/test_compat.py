"""Every file in ../shared/compat/envoyproxy-ratelimit behaves as upstream envoyproxy/ratelimit does:
the same limits when it loads, a rejection for the same reason when upstream rejects it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit_svc.config import UNITS, ConfigError, RateLimitConfig, parse_config
from ratelimit_svc.lookup import find_limit

COMPAT = Path(__file__).resolve().parents[3] / "shared" / "compat" / "envoyproxy-ratelimit"
TEST_CONFIG = COMPAT / "test-config"
EXAMPLES = COMPAT / "examples"
D = "test-domain"


def load(*names: str, merge: bool = False, folder: Path = TEST_CONFIG) -> RateLimitConfig:
    return parse_config([(n, (folder / n).read_text()) for n in names], merge_domains=merge)


def rejects(reason: str, *names: str, merge: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(*names, merge=merge)
    assert info.value.reason == reason
    assert info.value.file == names[-1]
    assert str(info.value).startswith(names[-1])
    return info.value


def limit_of(config: RateLimitConfig, *entries: tuple[str, str], domain: str = D) -> tuple[int, str, str] | None:
    """(requests_per_unit, unit name, stats key) of the limit that applies, or None."""
    match = find_limit(config, domain, tuple(entries))
    if match is None:
        return None
    if match.limit.unlimited:
        return (0, "UNLIMITED", match.stats_key)
    unit = next(name for name, number in UNITS.items() if number == match.limit.unit)
    return (match.limit.requests_per_unit, unit, match.stats_key)


def test_every_compat_file_has_a_test() -> None:
    covered = {
        "bad_limit_unit.yaml", "bad_yaml.yaml", "basic_config.yaml", "duplicate_domain.yaml", "duplicate_key.yaml",
        "empty_domain.yaml", "empty_key.yaml", "merge_domain_key1.yaml", "merge_domain_key2.yaml",
        "metadata.yaml", "misspelled_key.yaml", "misspelled_key2.yaml", "non_map_list.yaml",
        "non_string_key.yaml", "replaces_empty.yaml", "replaces_self.yaml", "shadowmode_config.yaml",
        "share_threshold.yaml", "unlimited_with_unit.yaml", "wildcard.yaml",
        "config.yaml", "example.yaml", "envoy-proxy.yaml",
    }
    present = {p.name for p in COMPAT.rglob("*.yaml")}
    assert present <= covered, f"untested compat files: {sorted(present - covered)}"


def test_bad_limit_unit_is_rejected() -> None:
    error = rejects("invalid rate limit unit 'foo'", "bad_limit_unit.yaml")
    assert error.path == "test-domain.key1_value1"


def test_bad_yaml_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        load("bad_yaml.yaml")
    assert info.value.reason.startswith("error loading config file: line 2:")
    assert "unexpected end of stream" in info.value.reason


def test_basic_config_limits() -> None:
    config = load("basic_config.yaml")
    assert find_limit(config, "foo_domain", (("key1", "value1"),)) is None
    assert limit_of(config, ("key1", "something")) is None
    assert limit_of(config, ("key1", "value1")) is None  # placeholder without a limit
    assert limit_of(config, ("key2", "value2"), ("subkey", "subvalue")) is None  # deeper than the config
    assert limit_of(config, ("key5", "value5"), ("subkey5", "subvalue")) is None
    assert limit_of(config, ("key1", "value1"), ("subkey1", "something")) == (
        5, "SECOND", "test-domain.key1_value1.subkey1")
    assert limit_of(config, ("key1", "value1"), ("subkey1", "subvalue1")) == (
        10, "SECOND", "test-domain.key1_value1.subkey1_subvalue1")
    assert limit_of(config, ("key2", "something")) == (20, "MINUTE", "test-domain.key2")
    assert limit_of(config, ("key2", "value2")) == (30, "MINUTE", "test-domain.key2_value2")
    assert limit_of(config, ("key2", "value3")) is None  # whitelisted value
    assert limit_of(config, ("key3", "foo")) == (1, "HOUR", "test-domain.key3")
    assert limit_of(config, ("key4", "foo")) == (1, "DAY", "test-domain.key4")
    assert find_limit(config, D, (("key4", "foo"),)).limit.name == "key4_rate_limit"
    assert limit_of(config, ("key5", "value5")) == (15, "DAY", "test-domain.key5_value5")
    assert limit_of(config, ("key5", "value5"), ("subkey5", "subvalue5")) == (
        25, "DAY", "test-domain.key5_value5.subkey5_subvalue5")
    assert limit_of(config, ("key6", "x")) == (0, "UNLIMITED", "test-domain.key6")
    # detailed_metric puts the request's value into the stats key
    assert limit_of(config, ("key7", "unspecified_value")) == (70, "MINUTE", "test-domain.key7_unspecified_value")


def test_duplicate_domain_is_rejected_without_merge() -> None:
    rejects("duplicate domain 'test-domain' in config file", "basic_config.yaml", "duplicate_domain.yaml")


def test_duplicate_key_is_rejected() -> None:
    rejects("duplicate descriptor composite key 'test-domain.key1_value1'", "duplicate_key.yaml")


def test_empty_domain_is_rejected() -> None:
    rejects("config file cannot have empty domain", "empty_domain.yaml")


def test_empty_key_is_rejected() -> None:
    rejects("descriptor has empty key", "empty_key.yaml")


def test_merge_domain_files_merge_when_enabled() -> None:
    config = load("merge_domain_key1.yaml", "merge_domain_key2.yaml", merge=True)
    assert limit_of(config, ("key1", "value1")) == (10, "MINUTE", "test-domain.key1_value1")
    assert limit_of(config, ("key2", "value2")) == (20, "MINUTE", "test-domain.key2_value2")


def test_merge_domain_files_are_rejected_without_merge() -> None:
    rejects("duplicate domain 'test-domain' in config file", "merge_domain_key1.yaml", "merge_domain_key2.yaml")


def test_merging_the_same_key_twice_is_rejected() -> None:
    rejects("duplicate descriptor composite key 'test-domain.key1_value1'",
            "merge_domain_key1.yaml", "merge_domain_key1.yaml", merge=True)


METADATA_CONFIG = """domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 2}
    metadata: %s
"""


def test_a_date_in_metadata_stays_the_text_it_was_written_as() -> None:
    config = parse_config([("m.yaml", METADATA_CONFIG % "{since: 2024-01-01, bad: 2020-13-45, n: 3, ok: true}")])
    assert dict(find_limit(config, "d", (("a", "x"),)).limit.metadata) == {
        "since": "2024-01-01", "bad": "2020-13-45", "n": 3, "ok": True}


@pytest.mark.parametrize(("value", "problem"), [
    ("{x: !foo bar}", "unsupported value '!foo' in metadata"),
    ("{x: !!binary aGk=}", "unsupported value 'tag:yaml.org,2002:binary' in metadata"),
])
def test_metadata_that_is_not_plain_data_is_a_config_error_naming_its_line(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_config([("m.yaml", METADATA_CONFIG % value)])
    assert "m.yaml" in str(info.value) and info.value.line == 5


def test_metadata_is_exempt_from_key_validation_and_kept() -> None:
    config = load("metadata.yaml")
    sub = find_limit(config, D, (("key1", "value1"), ("subkey1", "x")))
    assert sub.limit.requests_per_unit == 5
    assert dict(sub.limit.metadata) == {"name": "service_1"}
    assert find_limit(config, D, (("key1", "value1"), ("subkey1", "subvalue1"))).limit.metadata is None
    key2 = find_limit(config, D, (("key2", "any"),))
    assert key2.limit.requests_per_unit == 20
    assert dict(key2.limit.metadata["service_with_quota"]) == {"name": "service_2"}


def test_misspelled_key_is_rejected() -> None:
    rejects("config error, unknown key 'ratelimit'", "misspelled_key.yaml")


def test_misspelled_nested_key_is_rejected() -> None:
    rejects("config error, unknown key 'requestsperunit'", "misspelled_key2.yaml")


def test_list_of_non_maps_is_rejected() -> None:
    rejects("config error, yaml file contains list of type other than map: a", "non_map_list.yaml")


def test_non_string_key_is_rejected() -> None:
    rejects("config error, key is not of type string: 0.25", "non_string_key.yaml")


def test_empty_replaces_entry_is_rejected() -> None:
    rejects("should not have an empty replaces entry", "replaces_empty.yaml")


def test_replacing_itself_is_rejected() -> None:
    rejects("replaces should not contain name of same descriptor", "replaces_self.yaml")


def test_unlimited_with_unit_is_rejected() -> None:
    rejects("should not specify rate limit unit when unlimited", "unlimited_with_unit.yaml")


def test_shadow_mode_config() -> None:
    config = load("shadowmode_config.yaml")

    def shadow(*entries: tuple[str, str]) -> tuple[int, bool]:
        match = find_limit(config, D, entries)
        return match.limit.requests_per_unit, match.limit.shadow_mode

    assert shadow(("key1", "value1"), ("subkey1", "something")) == (5, False)
    assert shadow(("key1", "value1"), ("subkey1", "subvalue1")) == (10, True)
    assert shadow(("key2", "something")) == (20, True)
    assert shadow(("key2", "value2")) == (30, False)


def test_wildcard_config() -> None:
    config = load("wildcard.yaml")
    assert limit_of(config, ("noVal", "foo1"))[2] == "test-domain.noVal"
    assert limit_of(config, ("wild", "foo1")) == limit_of(config, ("wild", "foo2")) == (
        20, "MINUTE", "test-domain.wild_foo*")
    assert limit_of(config, ("nestedWild", "val1"), ("wild", "goo2")) == (
        20, "MINUTE", "test-domain.nestedWild_val1.wild_goo*")
    assert limit_of(config, ("wild", "bar")) is None
    assert limit_of(config, ("noWild", "foo1")) is None
    for value in ("barab", "bar123b", "barb"):
        assert limit_of(config, ("midWild", value))[2] == "test-domain.midWild_bar*b"
    for value in ("bara", "xbarb"):
        assert limit_of(config, ("midWild", value)) is None
    for value in ("foo123bar456baz", "foobarbaz"):
        assert limit_of(config, ("multiWild", value)) == (10, "MINUTE", "test-domain.multiWild_foo*bar*baz")
    for value in ("foo123baz", "bar456baz"):
        assert limit_of(config, ("multiWild", value)) is None


SHARE_CASES = [
    ([("files", "files/a.pdf")], 100, "test-domain.files_files/*", "test-domain_files_files/*_"),
    ([("files", "files/b.csv")], 100, "test-domain.files_files/*", "test-domain_files_files/*_"),
    ([("route", "api/v1"), ("method", "GET")], 60, "test-domain.route_api/*.method",
     "test-domain_route_api/*_method_GET_"),
    ([("service", "svc/user"), ("endpoint", "get")], 80, "test-domain.service_svc/*.endpoint_get",
     "test-domain_service_svc/*_endpoint_get_"),
    ([("nested", "parent"), ("files", "nested/file1.txt")], 200, "test-domain.nested_parent.files_nested/*",
     "test-domain_nested_parent_files_nested/*_"),
    ([("files", "top/file1.txt"), ("files", "nested/file1.txt")], 300, "test-domain.files_top/*.files_nested/*",
     "test-domain_files_top/*_files_nested/*_"),
    ([("path", "path/foo"), ("file", "file/doc1"), ("type", "pdf")], 120,
     "test-domain.path_path/*.file_file/*.type", "test-domain_path_path/*_file_file/doc1_type_pdf_"),
    ([("user", "user/alice"), ("resource", "res/file1"), ("action", "read")], 150,
     "test-domain.user_user/*.resource_res/*.action", "test-domain_user_user/*_resource_res/*_action_read_"),
    ([("file", "test1")], 50, "test-domain.file_test1", "test-domain_file_test1_"),
    ([("file", "test123")], 100, "test-domain.file_test*", "test-domain_file_test*_"),
    ([("midpath", "/api-beta-v1")], 100, "test-domain.midpath_/api*v1", "test-domain_midpath_/api*v1_"),
    ([("multiroute", "svceprpc")], 50, "test-domain.multiroute_svc*ep*rpc", "test-domain_multiroute_svc*ep*rpc_"),
    ([("midroute", "/api-beta-v2")], 80, "test-domain.midroute_/api*v2", "test-domain_midroute_/api*v2_"),
    ([("tenant", "t99prod"), ("resource", "resBBBv2")], 60, "test-domain.tenant_t*prod.resource_res*v2",
     "test-domain_tenant_t*prod_resource_res*v2_"),
]


def test_share_threshold_config() -> None:
    config = load("share_threshold.yaml")
    for entries, rpu, stats_key, counter_key in SHARE_CASES:
        match = find_limit(config, D, tuple(entries))
        assert match is not None, entries
        assert (match.limit.requests_per_unit, match.stats_key, match.counter_key) == (rpu, stats_key, counter_key)
    assert find_limit(config, D, (("midpath", "/api/v2"),)) is None
    assert find_limit(config, D, (("multiroute", "svcABCrpc"),)) is None


def test_example_config_yaml_loads() -> None:
    config = parse_config([("config.yaml", (EXAMPLES / "config.yaml").read_text())])
    for db in ("users", "default"):
        assert limit_of(config, ("database", db), domain="mongo_cps")[:2] == (500, "SECOND")


def test_example_yaml_loads_with_replaces_shadow_and_quota_mode() -> None:
    config = parse_config([("example.yaml", (EXAMPLES / "example.yaml").read_text())])
    rl = "rl"
    assert find_limit(config, rl, (("category", "account"),)).limit.replaces == ("bkthomps", "fake_name")
    assert limit_of(config, ("foo", "x"), domain=rl)[:2] == (2, "MINUTE")
    assert limit_of(config, ("foo", "x"), ("bar", "y"), domain=rl)[:2] == (3, "MINUTE")
    assert find_limit(config, rl, (("foo", "x"), ("bar", "bkthomps"))).limit.name == "bkthomps"
    assert limit_of(config, ("foo", "x"), ("bar", "banned"), domain=rl)[:2] == (0, "MINUTE")
    assert find_limit(config, rl, (("foo", "x"), ("baz", "shady"))).limit.shadow_mode
    assert limit_of(config, ("foo", "x"), ("bay", "y"), domain=rl)[1] == "UNLIMITED"
    assert limit_of(config, ("unspec", "abc"), domain=rl)[2] == "rl.unspec_abc"
    service = find_limit(config, rl, (("service", "service_2"),)).limit
    assert service.quota_mode and service.requests_per_unit == 2
    assert dict(service.metadata["service_with_quota"]) == {"name": "service_2"}


def test_envoy_proxy_example_is_envoy_config_not_ratelimit_config() -> None:
    """examples/envoy-proxy.yaml is upstream's Envoy bootstrap; as a ratelimit config it is rejected
    (upstream never loads it as one): its first unknown key is named."""
    with pytest.raises(ConfigError) as info:
        parse_config([("envoy-proxy.yaml", (EXAMPLES / "envoy-proxy.yaml").read_text())])
    assert info.value.reason.startswith("config error, unknown key")
