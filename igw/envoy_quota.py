"""Envoy config for quota push: the `rate_limit_quota` filter and its RLQS cluster.

In this mode Envoy enforces token buckets locally and only streams usage reports to the RLQS server
(ratelimit_svc, same process as the RLS); nothing leaves Envoy per request. Choices (see
../shared/RLQS_NOTES.md for what Envoy 1.40 really does):

- Bucket id = {gw: <static gateway name>, tenant: x-igw-tenant, model: x-igw-model}. ext_proc sets
  those headers only to validated tenants and registered models (it strips client-sent x-igw-*), so
  the bucket cache stays bounded by tenants x models; a request without both headers falls into one
  default bucket per gateway instead of creating buckets from arbitrary values.
- no_assignment_behavior: ALLOW_ALL. A token bucket there crashes Envoy 1.40; DENY_ALL would reject
  the first request of every new bucket until the first assignment arrives (~ms). ALLOW_ALL admits
  that first round trip's requests, which the server counts in its first report.
- Assignments carry a 600 s TTL (refreshed every 20 s): that TTL is how long a dead RLQS server's last
  budgets stay enforced. Envoy 1.40 ignores expired_assignment_behavior `reuse_last_assignment` (an
  expired bucket admits everything; tests/quota/test_rlqs_stream.py), so it is not configured; past the
  TTL the bucket is ALLOW_ALL, said explicitly: fail open, as the per-request filter (failure_mode_deny
  false) does at once.
- reporting_interval is required but Envoy 1.40 reports every 5 s whatever it says; the server pushes
  changes at once.
- deny response: 429, a JSON body of ext_proc's error shape, and `x-envoy-ratelimited: true` as the
  per-request mode's 429s carry (not its draft-03 x-ratelimit-* headers: the quota filter has no such option).
"""

from __future__ import annotations

import base64
from typing import Any

from igw.envoy_config import (
    DEFAULT_TIMEOUTS,
    MODEL_HEADER,
    TENANT_HEADER,
    Timeouts,
    duration,
    local_reply,
    local_reply_body,
)

Config = dict[str, Any]

_TYPE = "type.googleapis.com/"
QUOTA_FILTER_TYPE = _TYPE + "envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig"
BUCKET_SETTINGS_TYPE = _TYPE + "envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings"
HEADER_INPUT_TYPE = _TYPE + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
RLQS_CLUSTER = "rlqs"
RLQS_HEALTH_SERVICE = "envoy.service.rate_limit_quota.v3.RateLimitQuotaService"
DEFAULT_BUCKET_TENANT = "_default"
DENY_BODY = local_reply_body(local_reply("rate_limited"))  # byte for byte the per-request mode's 429 body
# x-envoy-ratelimited is what Envoy's per-request ratelimit filter marks its 429s with; clients and
# dashboards that tell a rate-limit 429 by it must see it in both modes.
DENY_HEADERS = {"content-type": "application/json", "x-envoy-ratelimited": "true"}


def _header_input(header: str) -> Config:
    return {"name": header, "typed_config": {"@type": HEADER_INPUT_TYPE, "header_name": header}}


def _present(header: str) -> Config:
    # Envoy rejects an empty-prefix string matcher; a RE2 ".+" says "present and non-empty".
    return {"single_predicate": {"input": _header_input(header),
                                 "value_match": {"safe_regex": {"google_re2": {}, "regex": ".+"}}}}


def _bucket_settings(name: str, id_builder: Config) -> Config:
    return {
        "name": name,
        "typed_config": {
            "@type": BUCKET_SETTINGS_TYPE,
            "bucket_id_builder": {"bucket_id_builder": id_builder},
            "reporting_interval": "5s",
            "deny_response_settings": {
                "http_status": {"code": 429},
                "http_body": base64.b64encode(DENY_BODY.encode()).decode(),  # a BytesValue in Envoy's JSON
                "response_headers_to_add": [
                    {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for key, value in DENY_HEADERS.items()
                ],
            },
            "no_assignment_behavior": {"fallback_rate_limit": {"blanket_rule": "ALLOW_ALL"}},
            "expired_assignment_behavior": {"fallback_rate_limit": {"blanket_rule": "ALLOW_ALL"}},
        },
    }


def rate_limit_quota_filter(
    gateway: str, cluster: str = RLQS_CLUSTER, domain: str = "igw", timeouts: Timeouts = DEFAULT_TIMEOUTS
) -> Config:
    per_tenant_model = _bucket_settings("tenant-model", {
        "gw": {"string_value": gateway},
        "tenant": {"custom_value": _header_input(TENANT_HEADER)},
        "model": {"custom_value": _header_input(MODEL_HEADER)},
    })
    default = _bucket_settings("default", {
        "gw": {"string_value": gateway},
        "tenant": {"string_value": DEFAULT_BUCKET_TENANT},
    })
    return {
        "name": "envoy.filters.http.rate_limit_quota",
        "typed_config": {
            "@type": QUOTA_FILTER_TYPE,
            "rlqs_server": {"envoy_grpc": {"cluster_name": cluster}, "timeout": duration(timeouts.ratelimit)},
            "domain": domain,
            "bucket_matchers": {
                "matcher_list": {"matchers": [{
                    "predicate": {"and_matcher": {"predicate": [_present(TENANT_HEADER), _present(MODEL_HEADER)]}},
                    "on_match": {"action": per_tenant_model},
                }]},
                "on_no_match": {"action": default},
            },
        },
    }
