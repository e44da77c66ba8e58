"""`igw tenants|keys|models ...`: operator commands for ext_proc's tenants, API keys and models.

Every command goes through store.py, the same functions the test-bed launcher uses. Values are
checked by argparse types, so a bad tenant id or model glob exits 2 like any bad argument; a missing
tenant, an existing one or an unreachable Redis exits 1 with one line. `--output json` prints one
JSON document for scripts. An issued key is printed once and cannot be shown again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from ext_proc.apikeys import DEFAULT_KEY_SECRET
from ext_proc.records import (
    ApiKey,
    Model,
    RecordError,
    Tenant,
    check_label,
    check_model_name,
    check_tenant_id,
    parse_model_globs,
)
from igw.runtime import non_empty, non_negative_int, positive_duration, positive_int

# The policy file's bounds for the same tenant fields (config/policy/policy.schema.json), so a tenant made by
# hand holds no value a policy could not: Envoy reads the timeout as an unsigned 32-bit header value.
MAX_TENANT_VALUE = 4_294_967_295
MAX_PRIORITY = 1000
MAX_KEY_LIFETIME_YEARS = 100


def _arg(check: Callable[[str], Any]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            check(text)
        except RecordError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = check.__name__.removeprefix("check_").removeprefix("parse_")
    return parse


def _bounded(parse: Callable[[str], int], highest: int) -> Callable[[str], int]:
    def bounded(text: str) -> int:
        value = parse(text)
        if value > highest:
            raise argparse.ArgumentTypeError(f"{value} is more than {highest}")
        return value

    return bounded


def _timeout_ms(text: str) -> int:
    """Milliseconds, as the tenant record stores them: 1ms up to the policy's bound (about 49 days)."""
    milliseconds = round(positive_duration(text) * 1000)
    if milliseconds < 1:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is under 1ms")
    if milliseconds > MAX_TENANT_VALUE:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is more than {MAX_TENANT_VALUE}ms (about 49 days)")
    return milliseconds


def _key_lifetime(text: str) -> float:
    """Refused beyond a century: a key that should never expire is issued without --expires-in, and a date
    past year 9999 could not even be printed (the key would be stored, then the command would fail)."""
    seconds = positive_duration(text)
    if seconds > MAX_KEY_LIFETIME_YEARS * 365.25 * 86400:
        raise argparse.ArgumentTypeError(f"lifetime {text!r} is more than {MAX_KEY_LIFETIME_YEARS} years "
                                         "(leave --expires-in out for a key that never expires)")
    return seconds




def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("text", "json"), default="text", help="text for people, json for scripts")


def _tenant_flags(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    """The tenant fields, as `tenants create` (department, tier, models required) and `tenants update`
    (each optional: only those given change) take them."""
    parser.add_argument("--department", required=creating, type=_arg(lambda v: check_label("department", v)))
    parser.add_argument("--tier", required=creating, type=_arg(lambda v: check_label("tier", v)),
                        help="free, standard or premium give defaults for the three limits below" if creating
                        else "the tier label; limits keep their values unless given too")
    parser.add_argument("--models", required=creating, type=_arg(parse_model_globs),
                        help="allowed models: comma-separated names or globs, e.g. 'llama-*,mistral-7b'"
                        + ("" if creating else "; replaces the list"))
    default = " (default: from tier)" if creating else ""
    parser.add_argument("--max-body-bytes", type=_bounded(positive_int, MAX_TENANT_VALUE),
                        help=f"largest request body{default}")
    parser.add_argument("--timeout", type=_timeout_ms, dest="timeout_ms", metavar="TIMEOUT",
                        help=f"upstream request timeout, e.g. 60s{default}")
    parser.add_argument("--priority", type=_bounded(non_negative_int, MAX_PRIORITY),
                        help=f"x-igw-priority value, 0-{MAX_PRIORITY}; higher is more urgent{default}")


def register(sub: argparse._SubParsersAction) -> None:
    tenant_id = _arg(check_tenant_id)

    tenants = sub.add_parser("tenants", help="create, update, list, suspend and activate tenants").add_subparsers(
        dest="tenants_command", metavar="COMMAND", required=True)
    create = tenants.add_parser("create", help="create an active tenant")
    create.add_argument("tenant_id", type=tenant_id, metavar="ID")
    _tenant_flags(create, creating=True)
    _output(create)
    create.set_defaults(func=_tenants_create)
    update = tenants.add_parser("update", help="change a tenant's department, tier, models or limits")
    update.add_argument("tenant_id", type=tenant_id, metavar="ID")
    _tenant_flags(update, creating=False)
    _output(update)
    update.set_defaults(func=_tenants_update)
    for name, func, text in (
        ("suspend", _tenants_suspend, "refuse the tenant's keys (403) until activated"),
        ("activate", _tenants_activate, "accept the tenant's keys again"),
        ("show", _tenants_show, "print one tenant"),
    ):
        cmd = tenants.add_parser(name, help=text)
        cmd.add_argument("tenant_id", type=tenant_id, metavar="ID")
        _output(cmd)
        cmd.set_defaults(func=func)
    listing = tenants.add_parser("list", help="list tenants")
    _output(listing)
    listing.set_defaults(func=_tenants_list)

    keys = sub.add_parser("keys", help="issue, list and revoke API keys").add_subparsers(
        dest="keys_command", metavar="COMMAND", required=True)
    secret_help = "HMAC secret the keys are hashed with; must match the service's (env IGW_KEY_SECRET)"
    issue = keys.add_parser("issue", help="issue a key for a tenant; the key is printed once")
    issue.add_argument("tenant_id", type=tenant_id, metavar="TENANT")
    issue.add_argument("--expires-in", type=_key_lifetime, help="key lifetime, e.g. 30m or 24h (default: none)")
    issue.add_argument("--key-secret", default=os.environ.get("IGW_KEY_SECRET") or DEFAULT_KEY_SECRET,
                       type=non_empty("key secret"), help=secret_help)
    _output(issue)
    issue.set_defaults(func=_keys_issue)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (or by the key itself)")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("key_id", nargs="?", metavar="KEY_ID", type=non_empty("key id"),
                       help="the id shown by `keys issue` / `keys list`")
    which.add_argument("--key", type=non_empty("key"), help="the key itself (avoid: it lands in shell history)")
    revoke.add_argument("--key-secret", default=os.environ.get("IGW_KEY_SECRET") or DEFAULT_KEY_SECRET,
                        type=non_empty("key secret"), help=secret_help)
    _output(revoke)
    revoke.set_defaults(func=_keys_revoke)
    klist = keys.add_parser("list", help="list keys (ids and state, never the keys)")
    klist.add_argument("tenant_id", nargs="?", type=tenant_id, metavar="TENANT")
    _output(klist)
    klist.set_defaults(func=_keys_list)

    models = sub.add_parser("models", help="register and remove models and aliases").add_subparsers(
        dest="models_command", metavar="COMMAND", required=True)
    model_name = _arg(check_model_name)
    reg = models.add_parser("register", help="register (or update) a model so requests for it are accepted")
    reg.add_argument("name", type=model_name, metavar="NAME")
    reg.add_argument("--inspect-body", action="store_true",
                     help="read its request bodies before routing (JSON checked; costs one more message)")
    _output(reg)
    reg.set_defaults(func=_models_register)
    alias = models.add_parser("alias", help="make ALIAS route to MODEL")
    alias.add_argument("alias", type=model_name, metavar="ALIAS")
    alias.add_argument("model", type=model_name, metavar="MODEL")
    _output(alias)
    alias.set_defaults(func=_models_alias)
    unalias = models.add_parser("unalias", help="remove an alias")
    unalias.add_argument("alias", type=model_name, metavar="ALIAS")
    _output(unalias)
    unalias.set_defaults(func=_models_unalias)
    remove = models.add_parser("remove", help="unregister a model (refused while aliases point at it)")
    remove.add_argument("name", type=model_name, metavar="NAME")
    _output(remove)
    remove.set_defaults(func=_models_remove)
    mlist = models.add_parser("list", help="list models and aliases")
    _output(mlist)
    mlist.set_defaults(func=_models_list)


# --- plumbing ----------------------------------------------------------------------------------------------

def _run(args: argparse.Namespace, action: Callable[[Any], Any]) -> Any:
    """Run a store call, turning every expected failure into one clear line (exit 1)."""
    import redis

    from ext_proc import store
    from igw.cli import CommandError

    client = store.connect(args.redis_url)
    try:
        return action(client)
    except (store.StoreError, RecordError) as exc:
        raise CommandError(str(exc)) from None
    except redis.RedisError as exc:
        from igw.redis_conn import masked_url  # the line lands in terminals and CI logs

        raise CommandError(f"cannot use Redis at {masked_url(args.redis_url)}: {exc}") from None
    finally:
        client.close()


def _emit(args: argparse.Namespace, document: Any, text: str) -> int:
    print(json.dumps(document, indent=2) if args.output == "json" else text)
    return 0


def _when(ts: float) -> str:
    """A stored time as ISO 8601; one no calendar date can show (a hand-edited or corrupt record) is printed
    as the number, so one bad record does not make `keys list` fail for every other."""
    if not ts:
        return "-"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def _tenant_doc(t: Tenant) -> dict[str, Any]:
    return {"id": t.id, "department": t.department, "tier": t.tier, "models": list(t.models),
            "max_body_bytes": t.max_body_bytes, "timeout_ms": t.timeout_ms, "priority": t.priority,
            "status": t.status, "created_at": _when(t.created_at)}


def _tenant_line(t: Tenant) -> str:
    return (f"{t.id}  status={t.status} department={t.department} tier={t.tier} models={','.join(t.models)} "
            f"max_body_bytes={t.max_body_bytes} timeout_ms={t.timeout_ms} priority={t.priority}")


def _key_doc(k: ApiKey) -> dict[str, Any]:
    state = "revoked" if k.revoked_at else ("expired" if k.expired(time.time()) else "active")
    return {"key_id": k.key_id, "tenant": k.tenant, "state": state, "created_at": _when(k.created_at),
            "expires_at": _when(k.expires_at) if k.expires_at else None,
            "revoked_at": _when(k.revoked_at) if k.revoked_at else None}


def _model_doc(m: Model) -> dict[str, Any]:
    return {"name": m.name, "inspect_body": m.inspect_body}


# --- commands ----------------------------------------------------------------------------------------------

def _tenant_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The tenant fields `tenants create` and `tenants update` share, as the store takes them."""
    return {"department": args.department, "tier": args.tier, "models": args.models,
            "max_body_bytes": args.max_body_bytes, "priority": args.priority,
            "timeout_ms": args.timeout_ms}


def _tenants_create(args: argparse.Namespace) -> int:
    from ext_proc import store

    tenant = _run(args, lambda c: store.create_tenant(c, args.tenant_id, **_tenant_fields(args)))
    return _emit(args, _tenant_doc(tenant), f"created {_tenant_line(tenant)}")


def _tenants_update(args: argparse.Namespace) -> int:
    from ext_proc import store

    tenant = _run(args, lambda c: store.update_tenant(c, args.tenant_id, **_tenant_fields(args)))
    return _emit(args, _tenant_doc(tenant), f"updated {_tenant_line(tenant)}")


def _tenants_suspend(args: argparse.Namespace) -> int:
    from ext_proc import store

    tenant = _run(args, lambda c: store.suspend_tenant(c, args.tenant_id))
    return _emit(args, _tenant_doc(tenant), f"suspended {tenant.id}")


def _tenants_activate(args: argparse.Namespace) -> int:
    from ext_proc import store

    tenant = _run(args, lambda c: store.activate_tenant(c, args.tenant_id))
    return _emit(args, _tenant_doc(tenant), f"activated {tenant.id}")


def _tenants_show(args: argparse.Namespace) -> int:
    from ext_proc import store

    tenant = _run(args, lambda c: store.get_tenant(c, args.tenant_id))
    return _emit(args, _tenant_doc(tenant), _tenant_line(tenant))


def _tenants_list(args: argparse.Namespace) -> int:
    from ext_proc import store

    tenants = _run(args, store.list_tenants)
    return _emit(args, [_tenant_doc(t) for t in tenants],
                 "\n".join(_tenant_line(t) for t in tenants) or "no tenants")


def _keys_issue(args: argparse.Namespace) -> int:
    from ext_proc import store

    issued = _run(args, lambda c: store.issue_key(c, args.tenant_id, secret=args.key_secret,
                                                  expires_in=args.expires_in))
    doc = {"key": issued.key, "key_id": issued.key_id, "tenant": issued.tenant,
           "expires_at": _when(issued.expires_at) if issued.expires_at else None}
    text = (f"{issued.key}\n(key id {issued.key_id} for tenant {issued.tenant}; expires "
            f"{doc['expires_at'] or 'never'}. This key is shown once: store it now.)")
    return _emit(args, doc, text)


def _keys_revoke(args: argparse.Namespace) -> int:
    from ext_proc import store

    record = _run(args, lambda c: store.revoke_key(c, key_id=args.key_id, key=args.key, secret=args.key_secret))
    return _emit(args, _key_doc(record), f"revoked key {record.key_id} of tenant {record.tenant}")


def _keys_list(args: argparse.Namespace) -> int:
    from ext_proc import store

    records = _run(args, lambda c: store.list_keys(c, args.tenant_id))
    docs = [_key_doc(k) for k in records]
    lines = [f"{k['key_id']}  tenant={k['tenant']} state={k['state']} created={k['created_at']} "
             f"expires={k['expires_at'] or 'never'}" for k in docs]
    return _emit(args, docs, "\n".join(lines) or "no keys")


def _models_register(args: argparse.Namespace) -> int:
    from ext_proc import store

    model = _run(args, lambda c: store.register_model(c, args.name, inspect_body=args.inspect_body))
    return _emit(args, _model_doc(model),
                 f"registered {model.name}" + (" (body inspected)" if model.inspect_body else ""))


def _models_alias(args: argparse.Namespace) -> int:
    from ext_proc import store

    _run(args, lambda c: store.set_alias(c, args.alias, args.model))
    return _emit(args, {"alias": args.alias, "model": args.model}, f"{args.alias} -> {args.model}")


def _models_unalias(args: argparse.Namespace) -> int:
    from ext_proc import store

    _run(args, lambda c: store.remove_alias(c, args.alias))
    return _emit(args, {"alias": args.alias, "removed": True}, f"removed alias {args.alias}")


def _models_remove(args: argparse.Namespace) -> int:
    from ext_proc import store

    _run(args, lambda c: store.remove_model(c, args.name))
    return _emit(args, {"model": args.name, "removed": True}, f"removed model {args.name}")


def _models_list(args: argparse.Namespace) -> int:
    from ext_proc import store

    models, aliases = _run(args, lambda c: (store.list_models(c), store.list_aliases(c)))
    lines = [f"{m.name}" + ("  (body inspected)" if m.inspect_body else "") for m in models]
    lines += [f"{a} -> {m}" for a, m in aliases.items()]
    return _emit(args, {"models": [_model_doc(m) for m in models], "aliases": aliases},
                 "\n".join(lines) or "no models")
