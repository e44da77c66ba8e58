"""Counting ready replicas from EndpointSlices (pure)."""

from __future__ import annotations

from igw.replica_counting import SliceIndex, count_slices, endpoint_ready, summarize
from tests.replicas.slices import endpoint, endpoint_slice, model_slice


def test_ready_endpoints_of_one_slice_are_counted_by_pod_identity() -> None:
    counts = count_slices([model_slice("llama", ["llama-a", "llama-b", "llama-c"], ready=[True, True, False])])
    assert counts["llama"].ready == 2
    assert counts["llama"].replicas == ("models/llama-a", "models/llama-b")
    assert counts["llama"].versions == {"": 2}


def test_slices_without_the_model_label_are_ignored() -> None:
    unlabeled = endpoint_slice("web-x1", "web", [endpoint("web-a", "10.0.0.1")])
    assert summarize(unlabeled) is None
    assert count_slices([unlabeled]) == {}


def test_several_slices_of_one_service_are_merged() -> None:
    first = model_slice("llama", ["p1", "p2"], suffix="aaaaa")
    second = model_slice("llama", ["p3"], suffix="bbbbb")
    assert count_slices([first, second])["llama"].ready == 3


def test_an_endpoint_listed_in_two_slices_counts_once() -> None:
    first = model_slice("llama", ["p1", "p2"], suffix="aaaaa")
    moving = model_slice("llama", ["p2", "p3"], suffix="bbbbb")
    assert count_slices([first, moving])["llama"].replicas == ("models/p1", "models/p2", "models/p3")


def test_dual_stack_slices_of_the_same_pods_count_once() -> None:
    v4 = endpoint_slice("llama-v4", "llama", [endpoint("p1", "10.0.0.1")], model="llama")
    v6 = endpoint_slice("llama-v6", "llama", [endpoint("p1", "fd00::1")], model="llama", address_type="IPv6")
    assert count_slices([v4, v6])["llama"].ready == 1


def test_an_endpoint_is_ready_if_any_listing_says_so() -> None:
    stale = endpoint_slice("s1", "llama", [endpoint("p1", "10.0.0.1", ready=False)], model="llama")
    fresh = endpoint_slice("s2", "llama", [endpoint("p1", "10.0.0.1", ready=True)], model="llama")
    assert count_slices([stale, fresh])["llama"].ready == 1


def test_terminating_endpoints_are_not_ready_even_if_serving() -> None:
    draining = endpoint("p1", "10.0.0.1", ready=True, serving=True, terminating=True)
    assert endpoint_ready(draining) is False


def test_an_absent_ready_condition_means_ready() -> None:
    assert endpoint_ready(endpoint("p1", "10.0.0.1", ready=None, serving=True, terminating=None)) is True


def test_not_ready_endpoints_are_not_counted() -> None:
    assert endpoint_ready(endpoint("p1", "10.0.0.1", ready=False)) is False


def test_endpoints_without_target_ref_are_identified_by_address() -> None:
    eps = [endpoint("", "10.0.0.7", target=False), endpoint("", "10.0.0.8", target=False)]
    counts = count_slices([endpoint_slice("ext-x1", "ext", eps, model="ext")])
    assert counts["ext"].replicas == ("10.0.0.7", "10.0.0.8")


def test_same_pod_name_in_two_namespaces_is_two_replicas() -> None:
    a = model_slice("llama", ["p1"], namespace="team-a", suffix="a")
    b = model_slice("llama", ["p1"], namespace="team-b", suffix="b")
    assert count_slices([a, b])["llama"].ready == 2


def test_versions_come_from_the_version_label_of_each_service() -> None:
    v1 = model_slice("llama", ["v1-a", "v1-b"], version="v1")
    v2 = model_slice("llama", ["v2-a"], version="v2")
    counts = count_slices([v1, v2])
    assert counts["llama"].ready == 3
    assert counts["llama"].versions == {"v1": 2, "v2": 1}


def test_a_model_with_no_ready_endpoints_counts_zero() -> None:
    counts = count_slices([model_slice("llama", ["p1"], ready=[False])])
    assert counts["llama"].ready == 0
    assert counts["llama"].versions == {}


def test_custom_model_and_version_labels_are_honoured() -> None:
    obj = model_slice("ignored", ["p1"])
    obj["metadata"]["labels"]["example.com/model"] = "mistral"
    index = SliceIndex("example.com/model", "example.com/version")
    index.replace_all([obj])
    assert index.models() == ["mistral"]


def test_index_apply_reports_the_models_an_event_touches() -> None:
    index = SliceIndex()
    assert index.apply("ADDED", model_slice("llama", ["p1"])) == {"llama"}
    assert index.apply("BOOKMARK", {"metadata": {"resourceVersion": "9"}}) == set()
    assert index.count("llama").ready == 1


def test_index_relabelled_slice_moves_between_models() -> None:
    index = SliceIndex()
    obj = model_slice("llama", ["p1"])
    index.apply("ADDED", obj)
    moved = model_slice("mistral", ["p1"])
    moved["metadata"]["name"] = obj["metadata"]["name"]
    assert index.apply("MODIFIED", moved) == {"llama", "mistral"}
    assert not index.has_model("llama")
    assert index.count("mistral").ready == 1


def test_index_deleting_the_last_slice_removes_the_model() -> None:
    index = SliceIndex()
    obj = model_slice("llama", ["p1"])
    index.apply("ADDED", obj)
    assert index.apply("DELETED", obj) == {"llama"}
    assert index.models() == []
    assert index.count("llama").ready == 0


def test_index_replace_all_reports_models_before_and_after() -> None:
    index = SliceIndex()
    index.apply("ADDED", model_slice("old", ["p1"]))
    assert index.replace_all([model_slice("new", ["p2"])]) == {"old", "new"}
    assert index.models() == ["new"]


def test_an_endpoint_without_conditions_counts_as_ready() -> None:
    bare = {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "namespace": "models", "name": "p9"}}
    counts = count_slices([endpoint_slice("llama-x1", "llama", [bare], model="llama")])
    assert counts["llama"].replicas == ("models/p9",)
