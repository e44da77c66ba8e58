"""One gateway bed for the end-to-end tests (session-scoped: starting it is most of a test's cost).

Two replicas of ext_proc and of the rate-limit service (failover tests need a survivor) and two of each
demo model, with the quota policy in tests/e2e/ratelimit: one tenant per behaviour, and a limit no test
reaches for the tenant of tests that are not about 429s. Tests that take components down restore them
before they end, so later tests find the whole bed healthy. Tenants are created by the tests themselves
(operators' path: ext_proc/store.py), because a Redis outage test wipes and re-seeds Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ext_proc import store
from igw.launcher import BedOptions, GatewayBed

E2E_QUOTAS = Path(__file__).resolve().parent / "ratelimit"


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayBed]:
    deaths: list[object] = []
    options = BedOptions(replicas=2, model_replicas=2, max_model_replicas=4, rate_limit_config=E2E_QUOTAS,
                         log_dir=tmp_path_factory.mktemp("e2e-bed"))
    with GatewayBed(options, on_death=deaths.append) as running:
        yield running


def issue_key(redis_url: str, tenant: str, models: str = "*", tier: str = "standard",
              max_body_bytes: int | None = None) -> str:
    """A new API key of `tenant`, creating the tenant first when it does not exist yet."""
    client = store.connect(redis_url)
    try:
        try:
            store.get_tenant(client, tenant)
        except store.NotFound:
            store.create_tenant(client, tenant, department="e2e", tier=tier, models=models,
                                max_body_bytes=max_body_bytes)
        return store.issue_key(client, tenant).key
    finally:
        client.close()


@pytest.fixture
def key_for(bed: GatewayBed) -> Callable[..., str]:
    """key_for('burst') -> an API key of tenant 'burst' in the bed's current Redis."""
    return lambda tenant, **kwargs: issue_key(bed.state["redis_url"], tenant, **kwargs)
