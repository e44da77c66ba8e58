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
- expired_assignment_behavior: reuse the last assignment (for EXPIRED_REUSE_S after expiry), so a dead
  RLQS server leaves the last pushed budgets enforced instead of opening or closing the gate.
- reporting_interval is required but Envoy 1.40 reports every 5 s whatever it says; assignments carry
  a 60 s TTL and the server pushes changes at once.
"""

from __future__ import annotations

import base64
from typing import Any

from igw.envoy_config import DEFAULT_TIMEOUTS, MODEL_HEADER, TENANT_HEADER, Timeouts, duration

Config = dict[str, Any]

_TYPE = "type.googleapis.com/"
QUOTA_FILTER_TYPE = _TYPE + "envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig"
BUCKET_SETTINGS_TYPE = _TYPE + "envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings"
HEADER_INPUT_TYPE = _TYPE + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
RLQS_CLUSTER = "rlqs"
RLQS_HEALTH_SERVICE = "envoy.service.rate_limit_quota.v3.RateLimitQuotaService"
DEFAULT_BUCKET_TENANT = "_default"
EXPIRED_REUSE_S = 600
DENY_BODY = '{"error":{"code":429,"message":"rate limit exceeded"}}'


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
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            },
            "no_assignment_behavior": {"fallback_rate_limit": {"blanket_rule": "ALLOW_ALL"}},
            "expired_assignment_behavior": {
                "expired_assignment_behavior_timeout": f"{EXPIRED_REUSE_S}s",
                "reuse_last_assignment": {},
            },
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
