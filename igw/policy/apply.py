"""`igw policy diff` / `apply`: compare a policy with what is live (the rate-limit config directory and
the records in Redis) and make it live, whole or not at all.

Order of `apply`: load and validate the policy; render the rate-limit file and parse it together with
every other file of the directory exactly as the service will (an invalid result stops here, before
anything is written); read Redis; write the file under a temporary name; run the Redis transaction;
rename the file into place. The rename is atomic, so the service's hot reload (which polls the
directory) sees the old file or the new one, never half of one; and if Redis fails, the temporary
file is removed and nothing has changed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from igw.policy import ratelimit, records, spec
from ratelimit_svc.config import ConfigError, RateLimitConfig, describe_limit, parse_config
from ratelimit_svc.loader import config_files

if TYPE_CHECKING:
    import redis


class ApplyError(Exception):
    """The policy cannot be applied; nothing was changed."""


@dataclass(frozen=True)
class LimitChange:
    key: str
    action: str  # add, change, remove
    old: str = ""
    new: str = ""

    def render(self) -> str:
        if self.action == "add":
            return f"+ limit {self.key}: {self.new}"
        if self.action == "remove":
            return f"- limit {self.key}: {self.old}"
        return f"~ limit {self.key}: {self.old} -> {self.new}"


def _limits(config: RateLimitConfig | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if config is None:
        return out

    def walk(node: object) -> None:
        limit = node.limit  # type: ignore[attr-defined]
        if limit is not None:
            out[limit.full_key] = describe_limit(limit)
        for child in node.children.values():  # type: ignore[attr-defined]
            walk(child)

    for domain in config.domains.values():
        walk(domain.root)
    return out


def limits_diff(old: RateLimitConfig | None, new: RateLimitConfig) -> list[LimitChange]:
    before, after = _limits(old), _limits(new)
    changes = [LimitChange(k, "add", new=v) for k, v in after.items() if k not in before]
    changes += [LimitChange(k, "change", before[k], v) for k, v in after.items() if k in before and before[k] != v]
    changes += [LimitChange(k, "remove", old=v) for k, v in before.items() if k not in after]
    return sorted(changes, key=lambda c: c.key)


def _read_dir(directory: Path, replace: str | None, merge_domains: bool) -> RateLimitConfig:
    """Parse the directory as the service would, with our file's text replaced by `replace`."""
    target = directory / ratelimit.FILE_NAME
    pairs = []
    for path in config_files(directory):
        if path == target:
            continue
        pairs.append((str(path.relative_to(directory)), path.read_text()))
    if replace is not None:
        pairs.append((ratelimit.FILE_NAME, replace))
    elif target.exists():
        pairs.append((ratelimit.FILE_NAME, target.read_text()))
    return parse_config(sorted(pairs), merge_domains=merge_domains)


def current_config(directory: Path, merge_domains: bool = False) -> RateLimitConfig | None:
    return live_config(directory, merge_domains)[0]


def live_config(directory: Path, merge_domains: bool = False) -> tuple[RateLimitConfig | None, str | None]:
    """What the directory holds now, or why it does not load (a stale or half-written file, hand edits)."""
    if not directory.is_dir():
        return None, None
    try:
        return _read_dir(directory, None, merge_domains), None
    except ConfigError as exc:
        return None, str(exc)


def check_config(directory: Path, text: str, merge_domains: bool = False) -> RateLimitConfig:
    try:
        return _read_dir(directory, text, merge_domains)
    except ConfigError as exc:
        raise ApplyError(f"the rate-limit config would not load in {directory}: {exc}") from None


@dataclass(frozen=True)
class Plan:
    limit_changes: list[LimitChange]
    record_changes: list[records.Change]
    text: str
    want: records.Records
    have: records.Records
    live_error: str | None = None  # the directory's current config does not load: every limit shows as new

    @property
    def empty(self) -> bool:
        return (not self.limit_changes and self.live_error is None
                and all(c.action == "extra" for c in self.record_changes))

    def lines(self) -> list[str]:
        note = [] if self.live_error is None else [
            f"! the live rate-limit config does not load (limits below are shown as new): {self.live_error}"]
        return note + [c.render() for c in self.limit_changes] + [c.render() for c in self.record_changes]


def plan(policy: spec.Policy, client: redis.Redis, directory: Path, *, prune: bool = False,
         merge_domains: bool = False) -> Plan:
    # A mistyped path would otherwise diff as "every limit is new", and apply refuses it anyway.
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ApplyError(f"rate-limit config directory {directory} {what}")
    text = ratelimit.render_file(policy)
    new = check_config(directory, text, merge_domains)
    want = records.desired(policy)
    have = records.live(client)
    live, live_error = live_config(directory, merge_domains)
    return Plan(limits_diff(live, new), records.diff(want, have, prune=prune), text, want, have, live_error)


def apply(policy: spec.Policy, client: redis.Redis, directory: Path, *, prune: bool = False,
          merge_domains: bool = False) -> Plan:
    the_plan = plan(policy, client, directory, prune=prune, merge_domains=merge_domains)
    target = directory / ratelimit.FILE_NAME
    # Not *.yaml: the service ignores the temporary file until the rename.
    temporary = directory / f".{ratelimit.FILE_NAME}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as fh:
            fh.write(the_plan.text)
            fh.flush()
            os.fsync(fh.fileno())
        records.apply(client, the_plan.want, the_plan.have, prune=prune)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return the_plan
