"""The benchmarks' own parsing and arithmetic: what they print is only as right as these."""

from __future__ import annotations

import json

import pytest
import yaml

from bench import wrk
from bench.capacity import processes, shard_shares
from bench.gateway_stack import VARIANTS, envoy_bootstrap, infer_body, uses_ext_proc
from bench.openloop import HttpConnection, build_request
from igw.topology import Endpoint, ServiceEndpoint, Topology

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:10000/v2/models/m/infer
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  500.00us  12.00ms   90.00%
  Latency Distribution
     50%    1.05ms
     75%    1.30ms
     90%    1.80ms
     99%    4.20ms
  52000 requests in 5.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  10400.00
Transfer/sec:      2.00MB
"""


def test_wrk_output_gives_rate_percentiles_and_every_error_kind() -> None:
    result = wrk.parse(WRK_OUTPUT)
    assert (result.requests, result.rps) == (52000, 10400.0)
    assert (result.p50_ms, result.p99_ms) == (1.05, 4.2)
    assert (result.non_2xx, result.socket_errors, result.errors) == (7, 3, 10)


def test_wrk_latency_units_convert_to_milliseconds() -> None:
    assert wrk.parse(WRK_OUTPUT.replace("4.20ms", "1.50s")).p99_ms == 1500.0
    assert wrk.parse(WRK_OUTPUT.replace("1.05ms", "950.00us")).p50_ms == pytest.approx(0.95)


def test_unparseable_wrk_output_is_an_error() -> None:
    with pytest.raises(ValueError, match="unexpected wrk output"):
        wrk.parse("wrk: connection refused")


def test_lua_script_escapes_the_body_and_rotates_the_header() -> None:
    script = wrk.lua_script("POST", {"x-a": 'q"uote'}, b'{"k":"v"}', "x-igw-model", ["m1", "m2"])
    assert 'wrk.body = "{\\"k\\":\\"v\\"}"' in script
    assert 'wrk.headers["x-a"] = "q\\"uote"' in script
    assert 'local values = {"m1","m2"}' in script


def _feed(conn: HttpConnection, *chunks: bytes) -> list[int | None]:
    out = []
    for chunk in chunks:
        conn.buffer += chunk
        out.append(conn._complete())
    return out


def test_open_loop_client_waits_for_the_whole_content_length_body() -> None:
    conn = HttpConnection()
    assert _feed(conn, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", b"cde") == [None, 200]
    assert conn.buffer == bytearray()


def test_open_loop_client_reads_chunked_answers_to_the_last_chunk() -> None:
    conn = HttpConnection()
    head = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _feed(conn, head + b"3\r\nabc\r\n", b"0\r\n\r\n") == [None, 503]


def test_open_loop_request_carries_length_and_headers() -> None:
    raw = build_request("POST", "h:1", "/p", {"x-k": "v"}, b"body")
    assert raw.startswith(b"POST /p HTTP/1.1\r\nhost: h:1\r\ncontent-length: 4\r\nx-k: v\r\n\r\nbody")


def test_padded_infer_body_has_the_requested_size_and_stays_a_valid_request() -> None:
    body = infer_body(64 * 1024)
    assert len(body) == 64 * 1024
    assert json.loads(body)["inputs"][0]["shape"] == [1, 4]


def test_capacity_rounds_processes_up_at_the_planned_headroom() -> None:
    assert processes("ext_proc", 7.0, 0.7) == "10"
    assert processes("ext_proc", 0.01, 0.7) == "1"
    assert processes("redis", 0.5, 0.7) == "1"


def test_capacity_sizes_redis_shards_from_the_measured_busiest_shard() -> None:
    runs = {"runs": {"1": {"redis_cpu_us_per_call": 40.0, "busiest_shard_cpu_us_per_call": 40.0},
                     "2": {"redis_cpu_us_per_call": 60.0, "busiest_shard_cpu_us_per_call": 30.0},
                     "4": {"redis_cpu_us_per_call": 80.0, "busiest_shard_cpu_us_per_call": 20.0}}}
    shares = shard_shares(runs)
    assert shares == {1: 1.0, 2: 0.75, 4: 0.5}
    assert processes("redis", 0.9, 0.7, shares) == "2 shards"  # 0.9 x 0.75 = 0.675
    assert processes("redis", 1.2, 0.7, shares) == "4 shards"  # 0.9 on 2, 0.6 on 4
    assert processes("redis", 2.0, 0.7, shares) == "> 4 shards"
    assert processes("redis", 2.0, 0.7, {}) == "3+ shards (unmeasured)"
    assert shard_shares({"runs": {"2": {"redis_cpu_us_per_call": 1.0, "busiest_shard_cpu_us_per_call": 1.0}}}) == {}


def test_every_variant_renders_a_bootstrap_with_its_own_filter_chain() -> None:
    svc = (ServiceEndpoint(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)),)
    topo = Topology(Endpoint("127.0.0.1", 3), Endpoint("127.0.0.1", 4), Endpoint("127.0.0.1", 5), svc, svc,
                    {"bench-model": (Endpoint("127.0.0.1", 6),), "bench-inspect": (Endpoint("127.0.0.1", 7),)})
    for variant in VARIANTS.values():
        config = envoy_bootstrap(variant, topo, Endpoint("127.0.0.1", 1), None)
        yaml.safe_dump(config)
        # The echo variant runs the ext_proc filter but does not authenticate: its client sends x-igw-* itself.
        assert uses_ext_proc(config) == (variant.ext_proc or variant.processor == "ext_proc_echo"), variant.name
        assert "rlqs" in {c["name"] for c in config["static_resources"]["clusters"]}
