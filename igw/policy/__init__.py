"""The operator-facing quota policy: one YAML file (config/policy/policy.schema.json) that becomes the
rate-limit config, the ext_proc records in Redis and the Istio manifests.

Modules: spec (the validated values), load (YAML -> spec, errors with file:line: path), ratelimit (the
rate-limit service's YAML), records (ext_proc's Redis records: diff and apply), istio (manifests),
kube_schema (validation of every manifest against the CRD and Kubernetes schemas).
"""
