"""When a TLS server reads its certificate files again (igw.tls.FilesWatch): on any change, and after a
failed load both on the next change and, without one, after a pause."""

from __future__ import annotations

import os
import time
from pathlib import Path

from igw.tls import FilesWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch_of(tmp_path: Path, clock: Clock) -> tuple[FilesWatch, Path]:
    cert = tmp_path / "tls.crt"
    cert.write_text("one")
    return FilesWatch((str(cert), None), clock), cert


def test_unchanged_files_are_not_read_again(tmp_path: Path) -> None:
    watch, _ = watch_of(tmp_path, Clock())
    assert watch.due() is None


def test_a_rewritten_file_is_due(tmp_path: Path) -> None:
    watch, cert = watch_of(tmp_path, Clock())
    cert.write_text("two, longer")
    assert watch.due() is not None


def test_a_permission_fix_alone_makes_the_files_due(tmp_path: Path) -> None:
    watch, cert = watch_of(tmp_path, Clock())
    time.sleep(0.05)  # file times tick coarsely (a jiffy): the change must fall in a later tick
    os.chmod(cert, 0o600)  # same content, size and mtime: only ctime moves
    assert watch.due() is not None


def test_a_failed_load_is_not_retried_at_every_handshake(tmp_path: Path) -> None:
    clock = Clock()
    watch, cert = watch_of(tmp_path, clock)
    cert.write_text("broken")
    stamps = watch.due()
    assert stamps is not None
    watch.failed_with(stamps)
    clock.now += FilesWatch.RETRY_S - 1
    assert watch.due() is None


def test_a_failed_load_is_retried_after_the_pause_without_a_file_change(tmp_path: Path) -> None:
    clock = Clock()
    watch, cert = watch_of(tmp_path, clock)
    cert.write_text("unreadable for now")
    stamps = watch.due()
    assert stamps is not None
    watch.failed_with(stamps)
    clock.now += FilesWatch.RETRY_S
    assert watch.due() == stamps


def test_a_failed_load_is_retried_at_once_when_the_files_change_again(tmp_path: Path) -> None:
    clock = Clock()
    watch, cert = watch_of(tmp_path, clock)
    cert.write_text("half written")
    stamps = watch.due()
    assert stamps is not None
    watch.failed_with(stamps)
    cert.write_text("whole now, and longer")
    assert watch.due() not in (None, stamps)


def test_only_a_new_failure_is_news_to_log(tmp_path: Path) -> None:
    clock = Clock()
    watch, cert = watch_of(tmp_path, clock)
    cert.write_text("broken")
    stamps = watch.due()
    assert stamps is not None
    assert watch.failed_with(stamps) is True
    clock.now += FilesWatch.RETRY_S
    assert watch.failed_with(stamps) is False


def test_after_a_good_load_the_same_files_are_settled(tmp_path: Path) -> None:
    clock = Clock()
    watch, cert = watch_of(tmp_path, clock)
    cert.write_text("fixed")
    stamps = watch.due()
    assert stamps is not None
    watch.succeeded(stamps)
    clock.now += FilesWatch.RETRY_S * 2
    assert watch.due() is None
