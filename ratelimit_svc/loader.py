"""Read the config directory and keep the config in force up to date.

A reload parses every file into a brand-new immutable config and only then replaces the reference the
service reads, so a request sees either the old config or the new one, never a mix. A reload that fails
keeps the last good config, logs the error (file, line, path, reason) and counts it.

Changes are found by polling a cheap signature (paths, sizes, mtimes, inodes, and the resolved
directory, so upstream's symlink-swap deployments, RUNTIME_WATCH_ROOT, and Kubernetes ConfigMap
updates, which also swap a symlink, are all seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ratelimit_svc import metrics
from ratelimit_svc.config import ConfigError, RateLimitConfig, parse_config

log = logging.getLogger("ratelimit_svc.config")

Signature = tuple[str, tuple[tuple[str, int, int, int], ...]]


def config_files(directory: Path, *, ignore_dotfiles: bool = False) -> list[Path]:
    """Every *.yaml / *.yml below the directory, in a stable order (subdirectories included)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith("..") or (ignore_dotfiles and d.startswith("."))))
        for name in sorted(filenames):
            if ignore_dotfiles and name.startswith("."):
                continue
            if name.endswith((".yaml", ".yml")):
                found.append(Path(dirpath, name))
    return found


def read_config_dir(directory: Path, *, merge_domains: bool = False, ignore_dotfiles: bool = False) -> RateLimitConfig:
    pairs = []
    for path in config_files(directory, ignore_dotfiles=ignore_dotfiles):
        rel = str(path.relative_to(directory))
        try:
            pairs.append((rel, path.read_text()))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(rel, f"cannot read file: {exc}") from None
    return parse_config(pairs, merge_domains=merge_domains)


def signature(directory: Path, *, ignore_dotfiles: bool = False) -> Signature:
    entries = []
    for path in config_files(directory, ignore_dotfiles=ignore_dotfiles):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return os.path.realpath(directory), tuple(entries)


class ConfigHolder:
    """The config in force, swapped atomically on reload."""

    def __init__(self, directory: Path, *, merge_domains: bool = False, ignore_dotfiles: bool = False) -> None:
        self.directory = directory
        self.merge_domains = merge_domains
        self.ignore_dotfiles = ignore_dotfiles
        self.config: RateLimitConfig | None = None
        self.last_error: str | None = None
        self._signature: Signature | None = None
        self.generation = 0
        self.listeners: list[Callable[[], None]] = []  # told after a new config is in force

    def reload(self) -> bool:
        """Load the directory now; True if a new config is in force."""
        sig = signature(self.directory, ignore_dotfiles=self.ignore_dotfiles)
        try:
            config = read_config_dir(
                self.directory, merge_domains=self.merge_domains, ignore_dotfiles=self.ignore_dotfiles
            )
        except Exception as exc:  # ConfigError names file and line; anything else is a bug, but not fatal
            if not isinstance(exc, ConfigError):
                log.exception("unexpected error loading %s", self.directory)
            self._signature = sig  # do not retry the same broken files in a loop
            self.last_error = str(exc)
            metrics.CONFIG_LOAD_ERROR.inc()
            kept = "keeping the last good config" if self.config is not None else "no config loaded"
            log.error("config load failed (%s): %s", kept, exc)
            return False
        self._signature = sig
        self.config = config
        self.last_error = None
        self.generation += 1
        metrics.CONFIG_LOAD_SUCCESS.inc()
        metrics.CONFIG_LIMITS.set(config.limit_count())
        log.info(
            "config loaded: %d file(s), %d domain(s), %d limit(s)",
            len(config.files), len(config.domains), config.limit_count(),
        )
        return True

    def changed(self) -> bool:
        return signature(self.directory, ignore_dotfiles=self.ignore_dotfiles) != self._signature

    def unhealthy_reason(self, *, need_a_domain: bool = False) -> str | None:
        """Why the config makes the service unhealthy, or None. With no config in force every call would
        fail, so the service is unhealthy then (upstream, by default, stays healthy). `need_a_domain` is
        upstream's HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED: the config in force must also declare a domain,
        so a reload that leaves none turns the service unhealthy again; a reload that fails keeps the last
        good config and changes nothing."""
        if self.config is None:
            return f"no config loaded: {self.last_error or 'first load still running'}"
        if need_a_domain and not self.config.domains:
            return "the config in force declares no domain (HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED)"
        return None

    async def watch(self, interval: float, stop: asyncio.Event, *, load_first: bool = False) -> None:
        """Poll for changes until `stop`. `load_first` loads the directory at once, in a thread, before the
        first poll: FORCE_START_WITHOUT_INITIAL_CONFIG, where the ports open before the first load."""
        if load_first:
            try:
                if await asyncio.to_thread(self.reload):
                    for listener in self.listeners:
                        listener()
            except Exception:  # the watcher must outlive the first load too; it retries on the next change
                log.exception("first config load failed; still watching %s", self.directory)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                if self.changed():
                    # Editors and ConfigMap updates write in several steps: let the directory settle.
                    await asyncio.sleep(min(interval, 0.1))
                    # A 1,000-model config takes over a second to parse: in a thread, requests keep being
                    # answered (with the old config) meanwhile; the swap itself is one reference assignment.
                    if await asyncio.to_thread(self.reload):
                        for listener in self.listeners:
                            listener()
            except OSError as exc:
                log.error("cannot scan config directory %s: %s", self.directory, exc)
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("config watch step failed; still watching %s", self.directory)
