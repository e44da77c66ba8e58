"""`igw policy diff` / `apply`: compare a policy with what is live (the rate-limit config directory and
the records in Redis) and make it live, whole or not at all; where that cannot be promised (a failure
after Redis committed), say exactly which half is live.

Order of `apply`, chosen so that the only step left after the Redis commit is one atomic rename in the
same directory: load and validate the policy; render the rate-limit file and parse it together with
every other file of the directory exactly as the service will (an invalid result stops here); WATCH
the Redis keys the plan reads (and a counter every apply bumps), read Redis, and read it again under
WATCH so a change made meanwhile is caught; write and fsync the file under a temporary name; run the
Redis transaction (MULTI/EXEC); rename the file into place. The service's hot reload sees the old file
or the new one, never half of one.

Failures, and what they mean for the operator:
- anything before EXEC, a concurrent change (the WATCH fails) or a transaction Redis refused as a whole:
  `ApplyError`, nothing changed;
- EXEC sent but no answer (timeout, connection lost), or Redis ran it and a command in it failed:
  `IncompleteApply` with `redis_applied=None`: Redis may or may not hold the new records, the file is
  untouched;
- Redis committed, then the rename failed (a directory in the way, read-only or full file system):
  `IncompleteApply` with `redis_applied=True`: Redis is new, the file is old; re-running apply finishes.
Rolling Redis back instead was rejected: the rollback can fail the same way, and the records' timestamps
and the processors' invalidations cannot be undone, so the report would be no more true.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ext_proc import store
from igw.policy import ratelimit, records, spec
from ratelimit_svc.config import ConfigError, RateLimitConfig, describe_limit, parse_config
from ratelimit_svc.loader import config_files

if TYPE_CHECKING:
    import redis


# Bumped by every apply inside its transaction and WATCHed from before its reads: of two overlapping applies
# the second to commit fails, even where their Redis records do not differ (the rate-limit files may).
APPLY_COUNTER = "igw:policy:applies"


class ApplyError(Exception):
    """The policy cannot be applied; nothing was changed."""


class IncompleteApply(Exception):
    """Part of the apply may be live: `redis_applied` is True (Redis committed, the file was not replaced)
    or None (the transaction was sent and its outcome is unknown); the rate-limit file is never replaced."""

    def __init__(self, message: str, *, redis_applied: bool | None, plan: Plan) -> None:
        super().__init__(message)
        self.redis_applied = redis_applied
        self.plan = plan


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
        pairs.append((str(path.relative_to(directory)), _read_text(directory, path)))
    if replace is not None:
        pairs.append((ratelimit.FILE_NAME, replace))
    elif target.exists():
        pairs.append((ratelimit.FILE_NAME, _read_text(directory, target)))
    return parse_config(sorted(pairs), merge_domains=merge_domains)


def _read_text(directory: Path, path: Path) -> str:
    """A file the service would fail to read fails the config as the service's loader fails it: a
    ConfigError naming the file, which diff reports as "does not load" and apply refuses."""
    name = str(path.relative_to(directory))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(name, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") \
            from None
    except OSError as exc:
        raise ConfigError(name, f"cannot read file: {exc.strerror or exc}") from None


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


def _watched_keys(plan: Plan) -> Iterator[str]:
    """Every key the plan read or the transaction writes: a change to any of them after the WATCH fails
    the EXEC."""
    yield from (store.TENANTS, store.MODELS, store.ALIASES)
    for records_ in (plan.have, plan.want):
        yield from map(store.tenant_key, records_.tenants)
        for name in (*records_.models, *records_.aliases):  # a name may turn from model into alias
            yield store.model_key(name)
            yield store.alias_key(name)


def _discard(temporary: Path) -> str:
    """Remove our temporary file; if that fails too, say so rather than leave it unmentioned."""
    try:
        temporary.unlink(missing_ok=True)
    except OSError as exc:
        return f" (the temporary file {temporary} is left behind: {exc.strerror or exc})"
    return ""


def apply(policy: spec.Policy, client: redis.Redis, directory: Path, *, prune: bool = False,
          merge_domains: bool = False) -> Plan:
    """Make the policy live. `ApplyError` (and any Redis or OS error) means nothing was changed;
    `IncompleteApply` says which half may be live."""
    import redis as redis_lib

    target = directory / ratelimit.FILE_NAME
    # Not *.yaml: the service ignores the temporary file until the rename.
    temporary = directory / f".{ratelimit.FILE_NAME}.{os.getpid()}.tmp"
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(APPLY_COUNTER)
            the_plan = plan(policy, client, directory, prune=prune, merge_domains=merge_domains)
            pipe.watch(*sorted(set(_watched_keys(the_plan))))
            if records.live(client) != the_plan.have:  # changed between the plan's read and the WATCH
                raise ApplyError(CONCURRENT)
            if target.exists() and not target.is_file():
                raise ApplyError(f"cannot replace {target}: not a regular file")
            with open(temporary, "w", encoding="utf-8") as fh:
                fh.write(the_plan.text)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        try:
            pipe.multi()  # from here commands are queued, not sent: the only I/O left is EXEC
            pipe.incr(APPLY_COUNTER)
            records.queue(pipe, the_plan.want, the_plan.have, prune=prune)
            pipe.execute()
        except redis_lib.WatchError as exc:
            left = _discard(temporary)
            if isinstance(exc.__context__, redis_lib.ConnectionError | redis_lib.TimeoutError):
                raise _unknown(exc.__context__, "its outcome is unknown", target, left, the_plan) from None
            raise ApplyError(CONCURRENT + left) from None
        except redis_lib.ResponseError as exc:
            left = _discard(temporary)
            if isinstance(exc, redis_lib.ExecAbortError) or isinstance(exc.__context__, redis_lib.ExecAbortError):
                # refused while queueing: Redis discarded the whole transaction
                raise ApplyError(f"Redis refused the transaction: {exc}{left}") from None
            raise _unknown(exc, "a command in it failed", target, left, the_plan) from None
        except BaseException as exc:  # no answer (timeout, lost connection) or interrupted while waiting for one
            raise _unknown(exc, "its outcome is unknown", target, _discard(temporary), the_plan) from None
    try:
        os.replace(temporary, target)
    except OSError as exc:
        left = _discard(temporary)
        changed = sum(c.action != "extra" for c in the_plan.record_changes)
        raise IncompleteApply(
            f"Redis is up to date ({changed} record changes committed) but the rate-limit config is not: cannot "
            f"replace {target}: {exc.strerror or exc}{left}; the rate-limit service still enforces the previous "
            "limits", redis_applied=True, plan=the_plan) from None
    return the_plan


CONCURRENT = ("Redis changed while this apply ran (another `igw policy apply`, or records edited meanwhile); "
              "see `igw policy diff` for the state now")


def _unknown(exc: BaseException, what: str, target: Path, left: str, the_plan: Plan) -> IncompleteApply:
    return IncompleteApply(
        f"the Redis transaction was sent but {what} ({type(exc).__name__}: {exc}): Redis may hold the new "
        f"records, the old ones or some of each; the rate-limit config was not changed ({target} is as "
        f"before{left})", redis_applied=None, plan=the_plan)
