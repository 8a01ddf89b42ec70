"""Per-request balancers: fairness, least-request preference, ring-hash
stickiness and minimal disruption, exclusion, and hash keys from hash policies."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.backend import Backend
from dataplane.balancers import (
    Balancer,
    HashPolicy,
    LeastRequest,
    LeastRequestConfig,
    Random,
    RingHash,
    RingHashConfig,
    RoundRobin,
    hash_key_for,
    make_balancer,
)

HOSTS = tuple(Backend(f"10.0.0.{i}", 8080, f"web-{i}") for i in range(1, 21))
KEYS = [f"user-{i}".encode() for i in range(10_000)]


def hosts(n: int) -> tuple[Backend, ...]:
    return HOSTS[:n]


def ring_map(ring: RingHash, backends: tuple[Backend, ...]) -> list[Backend | None]:
    return [ring.pick(backends, key) for key in KEYS]


# --- the common interface ------------------------------------------------------------------------


@pytest.mark.parametrize("balancer", [RoundRobin(), LeastRequest(), Random(), RingHash()],
                         ids=lambda b: type(b).__name__)
def test_every_balancer_returns_none_for_no_backends_or_all_excluded(balancer: Balancer) -> None:
    assert balancer.pick((), b"k") is None
    assert balancer.pick(hosts(3), b"k", exclude=set(hosts(3))) is None
    assert balancer.pick(hosts(3), None, exclude=hosts(3)) is None  # any collection will do


@pytest.mark.parametrize("make", [RoundRobin, LeastRequest, Random, RingHash],
                         ids=lambda m: m.__name__)
def test_every_balancer_never_picks_an_excluded_backend(make: type[Balancer]) -> None:
    balancer = make(rng=random.Random(1))
    excluded = {HOSTS[0], HOSTS[2]}
    picks = {balancer.pick(hosts(4), key, exclude=excluded) for key in KEYS[:500]}
    assert picks == {HOSTS[1], HOSTS[3]}


def test_finished_without_started_is_a_caller_bug() -> None:
    balancer = LeastRequest()
    balancer.started(HOSTS[0])
    balancer.finished(HOSTS[0])
    assert balancer.active(HOSTS[0]) == 0
    with pytest.raises(ValueError, match="without a matching started"):
        balancer.finished(HOSTS[0])


def test_make_balancer_maps_envoy_lb_policy_names() -> None:
    assert type(make_balancer("ROUND_ROBIN")) is RoundRobin
    assert type(make_balancer("LEAST_REQUEST")) is LeastRequest
    assert type(make_balancer("RING_HASH")) is RingHash
    assert type(make_balancer("RANDOM")) is Random
    with pytest.raises(ValueError, match="MAGLEV.*not supported.*ROUND_ROBIN"):
        make_balancer("MAGLEV")


# --- round robin and random ----------------------------------------------------------------------


def test_round_robin_visits_every_backend_once_per_cycle() -> None:
    rr = RoundRobin(random.Random(7))
    picks = [rr.pick(hosts(3)) for _ in range(9)]
    assert Counter(picks) == {HOSTS[0]: 3, HOSTS[1]: 3, HOSTS[2]: 3}
    assert picks[:3] == picks[3:6] == picks[6:]


def test_round_robin_skips_excluded_and_keeps_its_turn() -> None:
    rr = RoundRobin(random.Random(0))
    backends = hosts(3)
    first = rr.pick(backends)
    assert first is not None
    # With the next in turn excluded, the one after it is chosen.
    nxt = backends[(backends.index(first) + 1) % 3]
    after = backends[(backends.index(first) + 2) % 3]
    assert rr.pick(backends, exclude={nxt}) == after
    assert rr.pick(backends) == first


def test_round_robin_start_is_random_per_proxy() -> None:
    starts = {RoundRobin(random.Random(seed)).pick(hosts(5)) for seed in range(50)}
    assert len(starts) == 5


def test_random_spreads_evenly() -> None:
    rnd = Random(random.Random(3))
    counts = Counter(rnd.pick(hosts(4)) for _ in range(8000))
    assert all(1800 < counts[b] < 2200 for b in hosts(4))


# --- least request -------------------------------------------------------------------------------


def test_least_request_never_picks_a_busy_backend_while_two_are_idle() -> None:
    lr = LeastRequest(rng=random.Random(5))
    busy = HOSTS[0]
    for _ in range(10):
        lr.started(busy)
    # Two distinct backends are drawn each time; at least one is idle and wins.
    picks = Counter(lr.pick(hosts(3)) for _ in range(3000))
    assert picks[busy] == 0
    assert 1300 < picks[HOSTS[1]] < 1700


def test_least_request_with_two_backends_always_takes_the_less_loaded() -> None:
    lr = LeastRequest(rng=random.Random(9))
    lr.started(HOSTS[1])
    assert all(lr.pick(hosts(2)) == HOSTS[0] for _ in range(200))


def test_least_request_prefers_less_loaded_under_simulated_load() -> None:
    # Requests to host 0 take 5x longer: P2C steers new requests away from it.
    lr = LeastRequest(rng=random.Random(11))
    backends = hosts(4)
    in_flight: list[tuple[int, Backend]] = []
    counts: Counter[Backend] = Counter()
    for tick in range(4000):
        for done in [r for r in in_flight if r[0] <= tick]:
            in_flight.remove(done)
            lr.finished(done[1])
        chosen = lr.pick(backends)
        assert chosen is not None
        lr.started(chosen)
        counts[chosen] += 1
        in_flight.append((tick + (50 if chosen == backends[0] else 10), chosen))
    assert counts[backends[0]] < min(counts[b] for b in backends[1:]) / 2


def test_least_request_spreads_evenly_when_loads_are_equal() -> None:
    lr = LeastRequest(rng=random.Random(2))
    counts = Counter(lr.pick(hosts(4)) for _ in range(8000))
    assert all(1800 < counts[b] < 2200 for b in hosts(4))


def test_least_request_choice_count_follows_envoy_validation() -> None:
    assert LeastRequestConfig().choice_count == 2
    with pytest.raises(ValueError, match="at least 2"):
        LeastRequestConfig(choice_count=1)


def test_least_request_is_deterministic_with_a_seeded_rng() -> None:
    a = [LeastRequest(rng=random.Random(42)).pick(hosts(5)) for _ in range(3)]
    b = [LeastRequest(rng=random.Random(42)).pick(hosts(5)) for _ in range(3)]
    assert a == b


# --- ring hash -----------------------------------------------------------------------------------


def test_ring_hash_same_key_same_backend_across_instances() -> None:
    # Two proxies (two nodes) with the same endpoints agree on every key.
    assert ring_map(RingHash(), hosts(5)) == ring_map(RingHash(), hosts(5))
    # ... whatever order the endpoints arrive in.
    assert ring_map(RingHash(), hosts(5)) == ring_map(RingHash(), tuple(reversed(hosts(5))))


def test_ring_hash_spreads_keys_over_backends() -> None:
    counts = Counter(ring_map(RingHash(), hosts(5)))
    assert all(1500 < counts[b] < 2500 for b in hosts(5)), counts


def test_ring_hash_ring_is_at_least_the_minimum_size() -> None:
    ring = RingHash()
    assert ring.ring_size(hosts(1)) >= 1024
    assert ring.ring_size(hosts(3)) >= 1024
    assert RingHash(RingHashConfig(minimum_ring_size=4096)).ring_size(hosts(5)) >= 4096
    assert RingHash(RingHashConfig(minimum_ring_size=8, maximum_ring_size=64)).ring_size(hosts(20)) <= 64
    with pytest.raises(ValueError, match="minimum_ring_size <= maximum_ring_size"):
        RingHashConfig(minimum_ring_size=2048, maximum_ring_size=1024)


@pytest.mark.parametrize("before,after", [(5, 6), (10, 11), (7, 8), (15, 16)])
def test_ring_hash_adding_a_backend_moves_only_keys_to_it(before: int, after: int) -> None:
    old = ring_map(RingHash(), hosts(before))
    new = ring_map(RingHash(), hosts(after))
    moved = [(o, n) for o, n in zip(old, new, strict=True) if o != n]
    assert all(n == HOSTS[after - 1] for _, n in moved)  # no key moves between old backends
    assert abs(len(moved) / len(KEYS) - 1 / after) < 0.05


@pytest.mark.parametrize("before,after", [(6, 5), (11, 10), (4, 3)])
def test_ring_hash_removing_a_backend_moves_only_its_keys(before: int, after: int) -> None:
    old = ring_map(RingHash(), hosts(before))
    new = ring_map(RingHash(), hosts(after))
    moved = [o for o, n in zip(old, new, strict=True) if o != n]
    removed = HOSTS[before - 1]
    if after >= 4:  # a host's share of the ring is fixed from 4 hosts on
        assert set(moved) == {removed}
        assert moved.count(removed) == old.count(removed)
    else:  # below, each host's share grows, as in Envoy; still far from a reshuffle
        assert len(moved) / len(KEYS) < 0.5


def test_ring_hash_excluding_a_backend_equals_removing_it() -> None:
    ring = RingHash()
    gone = HOSTS[2]
    excluded = [ring.pick(hosts(6), key, exclude={gone}) for key in KEYS]
    removed = ring_map(RingHash(), tuple(b for b in hosts(6) if b != gone))
    assert excluded == removed
    # and keys of the other backends stay put
    for before, after in zip(ring_map(ring, hosts(6)), excluded, strict=True):
        assert before == after or before == gone


def test_ring_hash_without_key_picks_at_random_among_allowed() -> None:
    ring = RingHash(rng=random.Random(4))
    picks = Counter(ring.pick(hosts(3), None, exclude={HOSTS[0]}) for _ in range(600))
    assert set(picks) == {HOSTS[1], HOSTS[2]}


_SHARED_RING = RingHash()  # rebuilt only when the set changes: keeps the property test fast


@given(n=st.integers(min_value=1, max_value=12), key=st.binary(max_size=64),
       excluded=st.sets(st.integers(min_value=0, max_value=11), max_size=11))
def test_ring_hash_pick_is_always_an_allowed_member(n: int, key: bytes, excluded: set[int]) -> None:
    backends = hosts(n)
    skip = {HOSTS[i] for i in excluded}
    chosen = _SHARED_RING.pick(backends, key, exclude=skip)
    if set(backends) <= skip:
        assert chosen is None
    else:
        assert chosen in backends and chosen not in skip



@given(seed=st.integers(min_value=0, max_value=2**32), n=st.integers(min_value=1, max_value=8),
       policy=st.sampled_from(["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"]),
       excluded=st.sets(st.integers(min_value=0, max_value=7), max_size=8))
def test_any_pick_is_an_allowed_member(seed: int, n: int, policy: str, excluded: set[int]) -> None:
    balancer = make_balancer(policy, random.Random(seed))
    backends = hosts(n)
    skip = {HOSTS[i] for i in excluded}
    for _ in range(5):
        chosen = balancer.pick(backends, exclude=skip)
        assert (chosen is None) == set(backends).issubset(skip)
        assert chosen is None or (chosen in backends and chosen not in skip)


# --- hash keys -----------------------------------------------------------------------------------


def test_hash_key_from_header_is_case_insensitive() -> None:
    policy = HashPolicy.header("X-User")
    assert hash_key_for(policy, {"x-user": "alice"}, {}, "10.1.0.5") == b"alice"
    assert hash_key_for(policy, {"X-USER": "alice"}, {}, "10.1.0.5") == b"alice"


def test_hash_key_from_cookie_and_source_ip() -> None:
    assert hash_key_for(HashPolicy.cookie("session"), {}, {"session": "s1"}, None) == b"s1"
    assert hash_key_for(HashPolicy.source_ip(), {}, {}, "10.1.0.5") == b"10.1.0.5"


def test_hash_key_is_none_when_no_policy_matches() -> None:
    policies = [HashPolicy.header("x-user"), HashPolicy.cookie("session")]
    assert hash_key_for(policies, {"other": "x"}, {}, "10.1.0.5") is None
    assert hash_key_for(HashPolicy.source_ip(), {}, {}, None) is None


def test_hash_key_falls_through_policies_and_stops_at_terminal() -> None:
    fallback = [HashPolicy.header("x-user", terminal=True), HashPolicy.source_ip()]
    assert hash_key_for(fallback, {"x-user": "alice"}, {}, "10.1.0.5") == b"alice"
    assert hash_key_for(fallback, {}, {}, "10.1.0.5") == b"10.1.0.5"
    combined = [HashPolicy.header("x-user"), HashPolicy.source_ip()]
    both = hash_key_for(combined, {"x-user": "alice"}, {}, "10.1.0.5")
    assert both not in (None, b"alice", b"10.1.0.5")
    assert both != hash_key_for(combined, {"x-user": "alice"}, {}, "10.1.0.6")


def test_hash_policy_needs_a_name_for_header_and_cookie() -> None:
    with pytest.raises(ValueError, match="header hash policy needs the header name"):
        HashPolicy.header("")


def test_same_user_sticks_to_one_backend_through_hash_key_and_ring() -> None:
    ring = RingHash()
    policy = HashPolicy.cookie("session")
    key = hash_key_for(policy, {}, {"session": "abc123"}, "10.1.0.5")
    first = ring.pick(hosts(5), key)
    assert all(ring.pick(hosts(5), key) == first for _ in range(20))
