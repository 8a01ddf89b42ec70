"""Shared fixtures. Tests marked ``root`` need root and the real kernel: they
build a sandbox (netns + cgroups, see sandbox/node.py) and run the real agent
in it. The session fails if any run left something on the machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandbox.node import Sandbox, leftovers
from sandbox.scenario import Scenario

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, netns, cgroups)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not IS_ROOT:
        return
    left = leftovers()
    if left:
        print("\nleft on the machine after the tests: " + "; ".join(left))
        session.exitstatus = 1


@pytest.fixture(scope="module")
def mesh() -> Iterator[Scenario]:
    """A meshed virtual node with the agent running, shared by a module's tests.
    Tests that change it put it back as they found it."""
    with Sandbox() as sb:
        sc = Scenario(sb).build()
        sc.start_agent()
        try:
            yield sc
        finally:
            sc.stop_agent()


@pytest.fixture
def fresh_scenario() -> Iterator[Scenario]:
    """A built sandbox without an agent, for tests that run their own."""
    with Sandbox() as sb:
        sc = Scenario(sb).build()
        try:
            yield sc
        finally:
            sc.stop_agent()
