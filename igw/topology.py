"""Where every process of the test bed listens: one description shared by the Envoy config generator,
the launcher (`igw up`) and the docker-compose check, so the three cannot disagree.

Two layouts exist. The *documented* one uses fixed ports (the README's ports table, the committed
envoy/envoy.yaml and compose); the *free* one asks the kernel for unused loopback ports, which is what
tests use so several beds can run side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_MODELS: tuple[str, ...] = ("demo-linear", "demo-logistic")

# The documented port layout. Replica i of a service adds i to its base; models get blocks of 10.
GATEWAY_PORT = 10000
ADMIN_PORT = 9901
REDIS_PORT = 16379
RATELIMIT_GRPC_BASE = 18100
RATELIMIT_HTTP_BASE = 18200
EXT_PROC_GRPC_BASE = 18300
EXT_PROC_HTTP_BASE = 18400
MODEL_BASE = 18500
MAX_REPLICAS = 10
MAX_MODELS = 50

# Envoy cluster names of the two gRPC services; model clusters are model_cluster_name(model).
EXT_PROC_CLUSTER = "ext_proc"
RATELIMIT_CLUSTER = "ratelimit"


def model_cluster_name(model: str) -> str:
    return f"model-{model}"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceEndpoint:
    """A gRPC service replica: Envoy talks to `grpc`, probes and metrics are on `http`."""

    grpc: Endpoint
    http: Endpoint


@dataclass(frozen=True)
class Topology:
    gateway: Endpoint
    admin: Endpoint
    redis: Endpoint
    ratelimit: tuple[ServiceEndpoint, ...]
    ext_proc: tuple[ServiceEndpoint, ...]
    models: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    # Endpoints declared in Envoy's model clusters beyond the running ones (`models`), so the test bed can
    # start more replicas later without reconfiguring Envoy; unstarted ones fail health checks and get no
    # traffic. Empty: Envoy lists exactly `models`.
    spare_models: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)

    def model_endpoints(self, model: str) -> tuple[Endpoint, ...]:
        """Every endpoint Envoy's cluster for `model` lists: the running replicas first, then the spares."""
        return self.models[model] + self.spare_models.get(model, ())

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis.host}:{self.redis.port}/0"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway.host}:{self.gateway.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin.host}:{self.admin.port}"


def validate_model_names(models: Sequence[str]) -> None:
    """Model names become header values, cluster names and compose service names: keep them simple."""
    if not models:
        raise ValueError("at least one model is required")
    if len(models) > MAX_MODELS:
        raise ValueError(f"{len(models)} models given; at most {MAX_MODELS}")
    seen: set[str] = set()
    for name in models:
        if not name or not all(c.isalnum() or c in "-_." for c in name) or not name[0].isalnum():
            raise ValueError(f"invalid model name {name!r} (letters, digits, '-', '_', '.'; starting alphanumeric)")
        if name in seen:
            raise ValueError(f"model {name!r} given twice")
        seen.add(name)


def _check_counts(replicas: int, model_replicas: int, max_model_replicas: int | None = None) -> int:
    """Validates the counts; returns how many endpoints each model cluster declares."""
    for label, value in (("replicas", replicas), ("model replicas", model_replicas)):
        if not 1 <= value <= MAX_REPLICAS:
            raise ValueError(f"{label} must be between 1 and {MAX_REPLICAS}, got {value}")
    if max_model_replicas is None:
        return model_replicas
    if not model_replicas <= max_model_replicas <= MAX_REPLICAS:
        raise ValueError(f"max model replicas must be between the model replicas ({model_replicas}) and "
                         f"{MAX_REPLICAS}, got {max_model_replicas}")
    return max_model_replicas


def documented_topology(
    models: Sequence[str] = DEFAULT_MODELS,
    *,
    replicas: int = 1,
    model_replicas: int = 1,
    host: str | Callable[[str], str] = "127.0.0.1",
    gateway_port: int = GATEWAY_PORT,
    admin_port: int = ADMIN_PORT,
    max_model_replicas: int | None = None,
) -> Topology:
    """The fixed layout. `host` is one address for all (loopback), or a function of the component name
    giving its hostname (compose: 'redis', 'ratelimit', 'ext-proc', 'model-<name>', 'envoy').
    `max_model_replicas` declares spare model endpoints up to that many per model (see Topology)."""
    validate_model_names(models)
    slots = _check_counts(replicas, model_replicas, max_model_replicas)
    at = host if callable(host) else (lambda _name, _h=host: _h)
    return Topology(
        gateway=Endpoint(at("envoy"), gateway_port),
        admin=Endpoint(at("envoy"), admin_port),
        redis=Endpoint(at("redis"), REDIS_PORT),
        ratelimit=tuple(
            ServiceEndpoint(Endpoint(at("ratelimit"), RATELIMIT_GRPC_BASE + i),
                            Endpoint(at("ratelimit"), RATELIMIT_HTTP_BASE + i))
            for i in range(replicas)
        ),
        ext_proc=tuple(
            ServiceEndpoint(Endpoint(at("ext-proc"), EXT_PROC_GRPC_BASE + i),
                            Endpoint(at("ext-proc"), EXT_PROC_HTTP_BASE + i))
            for i in range(replicas)
        ),
        models={
            name: tuple(Endpoint(at(model_cluster_name(name)), MODEL_BASE + 10 * j + i)
                        for i in range(model_replicas))
            for j, name in enumerate(models)
        },
        spare_models={
            name: tuple(Endpoint(at(model_cluster_name(name)), MODEL_BASE + 10 * j + i)
                        for i in range(model_replicas, slots))
            for j, name in enumerate(models) if slots > model_replicas
        },
    )


def free_topology(
    models: Sequence[str] = DEFAULT_MODELS,
    *,
    replicas: int = 1,
    model_replicas: int = 1,
    gateway_port: int | None = None,
    admin_port: int | None = None,
    pick: Callable[[], int] | None = None,
    max_model_replicas: int | None = None,
) -> Topology:
    """Every port not given is picked free on 127.0.0.1 (ports are distinct within the bed)."""
    from igw.procs import free_port

    validate_model_names(models)
    slots = _check_counts(replicas, model_replicas, max_model_replicas)
    chosen: set[int] = {p for p in (gateway_port, admin_port) if p}
    pick_one = pick or free_port

    def port() -> int:
        for _ in range(100):
            candidate = pick_one()
            if candidate not in chosen:
                chosen.add(candidate)
                return candidate
        raise RuntimeError("could not pick distinct free ports")

    def ep(p: int | None = None) -> Endpoint:
        return Endpoint("127.0.0.1", p or port())

    return Topology(
        gateway=ep(gateway_port),
        admin=ep(admin_port),
        redis=ep(),
        ratelimit=tuple(ServiceEndpoint(ep(), ep()) for _ in range(replicas)),
        ext_proc=tuple(ServiceEndpoint(ep(), ep()) for _ in range(replicas)),
        models={name: tuple(ep() for _ in range(model_replicas)) for name in models},
        spare_models={name: tuple(ep() for _ in range(slots - model_replicas))
                      for name in models if slots > model_replicas},
    )
