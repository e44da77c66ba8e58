"""The quota policy as frozen values, after loading and validation (load.py) and before rendering.

Every default is resolved here, so the renderers (rate-limit config, ext_proc records, Istio manifests)
never guess and never disagree about a value the operator left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNITS = ("second", "minute", "hour", "day")
DEFAULT_MODEL_PORT = 8080
DEFAULT_IMAGE = "igw-services:dev"  # compose/Dockerfile's tag
DEFAULT_PREWARM_PATH = "/v2/health/ready"  # until models expose a warm-up endpoint: see Deployment.prewarm_path
# How a gateway enforces rate limits: per_request asks the rate-limit service on every request (ratelimit
# filter); quota_push enforces token buckets the same service pushes over RLQS (rate_limit_quota filter).
ENFORCEMENTS = ("per_request", "quota_push")
DEFAULT_ENFORCEMENT = "per_request"


@dataclass(frozen=True, slots=True)
class Override:
    """What one tenant gets on one model instead of its share: exactly one field is set."""

    limit: int | None = None
    share: float | None = None
    unlimited: bool = False


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    department: str
    tier: str
    models: tuple[str, ...]  # globs over canonical model names
    limit: int | None  # [tenant] requests per unit; None: defaults.tenant_limit
    share: float
    overrides: dict[str, Override]  # canonical model name -> override
    shadow_mode: bool
    gateway: str | None  # dedicated gateway name
    max_body_bytes: int
    timeout_ms: int
    priority: int
    line: int = 0


@dataclass(frozen=True, slots=True)
class Toleration:
    """A pod toleration (Kubernetes' fields; the loader has checked their combinations)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""  # empty: every effect
    seconds: int | None = None  # NoExecute only: how long the pod stays once tainted


@dataclass(frozen=True, slots=True)
class Placement:
    """What a model's pods ask of the scheduler. Empty requests and limits leave the pod BestEffort: the first
    evicted under node pressure and never given a GPU, so a policy of real models sets them (per model or in
    defaults.deployment). Quantities are Kubernetes quantity strings, checked at load."""

    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()


@dataclass(frozen=True, slots=True)
class Deployment:
    image: str
    args: tuple[str, ...]
    replicas: int
    container_port: int
    # The pre-warm hook: the startup probe waits for this path, so a replica joins the Service (and the
    # replica count that sizes quotas) only once warm. Point it at the model server's warm-up endpoint.
    prewarm_path: str
    startup_seconds: int
    placement: Placement = field(default_factory=Placement)  # defaults.deployment resolved in


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int
    max_pending_requests: int
    max_requests: int


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    namespace: str
    service: str
    port: int
    per_replica: int | None
    limit: int | None
    min: int
    max: int | None
    aliases: tuple[str, ...]
    inspect_body: bool
    shadow_mode: bool
    connection_pool: ConnectionPool
    deployment: Deployment | None
    line: int = 0

    @property
    def host(self) -> str:
        return f"{self.service}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    replicas: int
    max_replicas: int
    cpu: str
    memory: str


@dataclass(frozen=True, slots=True)
class ServicesTls:
    """gRPC between the gateways and ext_proc / the rate-limit service over TLS (services.tls).

    server_secret: kubernetes.io/tls Secret in the services namespace (tls.crt, tls.key; with mutual,
    ca.crt: the CA of the gateways' client certificates). gateway_secret: Secret of that name in every
    gateway's namespace (tls.crt, tls.key: the gateway's client certificate; ca.crt: the CA of the
    services' certificates), which Istio's gateway SDS serves as kubernetes://<name> and
    kubernetes://<name>-cacert."""

    server_secret: str
    gateway_secret: str
    mutual: bool = True
    client_san: str = ""  # the services' GRPC_CLIENT_TLS_SAN (mutual only); empty: any client of the CA


@dataclass(frozen=True, slots=True)
class Services:
    namespace: str
    image: str
    redis_url: str
    redis_shards: tuple[str, ...]  # rate-limit counters; empty: on redis_url
    ext_proc: ServiceSpec
    ratelimit: ServiceSpec
    replica_watcher: ServiceSpec
    tls: ServicesTls | None = None  # None: plain-text gRPC (the default)


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    namespace: str
    selector: dict[str, str]
    hosts: tuple[str, ...]
    port: int
    enforcement: str = DEFAULT_ENFORCEMENT
    # The Istio revision (or revision tag) that injects dedicated gateways without their own; None: the
    # default revision. The shared gateway is Istio's own install and is not affected.
    istio_revision: str | None = None


@dataclass(frozen=True, slots=True)
class DedicatedGateway:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    port: int
    replicas: int
    max_replicas: int
    enforcement: str = DEFAULT_ENFORCEMENT  # loader default: the shared gateway's
    istio_revision: str | None = None  # loader default: gateway.istio_revision; None: the default revision

    @property
    def selector(self) -> dict[str, str]:
        return {"istio": self.name}


@dataclass(frozen=True, slots=True)
class Policy:
    file: str
    unit: str
    algorithm: str
    tenant_limit: int | None
    tenant_model_limit: int | None
    shadow_mode: bool
    gateway: Gateway
    dedicated_gateways: dict[str, DedicatedGateway]
    services: Services
    tenants: dict[str, Tenant]
    models: dict[str, Model]
    aliases: dict[str, str]  # alias -> canonical model (chains resolved)
    allowed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tenant -> canonical models it may call

    def tenants_of_gateway(self, gateway: str | None) -> list[Tenant]:
        return [t for t in self.tenants.values() if t.gateway == gateway]
