"""Version pinning: the gateway loads the served version's catalog from the repository and checks its hash."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from onerec.serving.layout import Manifest
from service.catalog import load_latest, load_version
from service.metrics import Metrics
from service.model_client import ModelError, ServedModel
from service.services import VersionPin

pytestmark = pytest.mark.slow


class ServedBy:
    def __init__(self, served: ServedModel | None):
        self.value = served

    async def served(self) -> ServedModel:
        if self.value is None:
            raise ModelError("triton_unavailable", "down")
        return self.value


@pytest.fixture(scope="module")
def model_dir(exported_repo, tmp_path_factory):
    """A copy of the exported model with a second version (same files) and a broken third."""
    root = tmp_path_factory.mktemp("pin") / "onerec"
    shutil.copytree(exported_repo / "onerec" / "1", root / "1")
    shutil.copytree(exported_repo / "onerec" / "1", root / "2")
    (root / "3").mkdir()
    (root / "3" / "manifest.json").write_text("{not json")
    return root


def test_load_version_checks_the_hash(model_dir):
    good = Manifest.load(model_dir / "1").catalog_hash
    pinned = load_version(model_dir, "1", good)
    assert pinned.matched and pinned.version == "1" and pinned.max_history == 32  # the tiny preset's
    bad = load_version(model_dir, "1", "0" * 64)
    assert not bad.matched and "does not match" in bad.problem


def test_load_latest_skips_broken_versions(model_dir):
    latest = load_latest(model_dir)
    assert latest is not None and latest.version == "2" and not latest.matched


def test_sync_pins_the_served_version_and_counts_mismatches(model_dir):
    good = Manifest.load(model_dir / "1").catalog_hash
    metrics = Metrics()

    async def scenario():
        fake = ServedBy(None)
        pin = VersionPin(model_dir, fake, metrics)  # type: ignore[arg-type]
        await pin.load_local()
        assert pin.pinned().version == "2" and not await pin.sync()  # Triton down: nothing pinned yet
        fake.value = ServedModel("1", good)
        assert await pin.sync() and pin.pinned().version == "1"
        fake.value = ServedModel("1", "f" * 64)  # same version, another catalog hash: refuse
        assert not await pin.sync() and not pin.pinned().matched
        fake.value = ServedModel("1", good)
        assert await pin.sync() and pin.pinned().matched
        fake.value = ServedModel("9", good)  # a version the gateway cannot read
        assert not await pin.sync()

    asyncio.run(scenario())
    assert metrics.registry.get_sample_value("onerec_gateway_catalog_mismatches_total") == 2  # other hash, unreadable 9


def test_canary_users_get_the_candidate_and_a_mismatched_canary_sends_them_back(model_dir):
    good = Manifest.load(model_dir / "1").catalog_hash
    users = [f"user-{i}" for i in range(2000)]

    async def scenario():
        fake = ServedBy(ServedModel("1", good, canary_version="2", canary_catalog_hash=good, canary_share=0.2))
        pin = VersionPin(model_dir, fake, Metrics())  # type: ignore[arg-type]
        assert await pin.sync()
        first = {user: pin.pinned(user).version for user in users}
        assert set(first.values()) == {"1", "2"}
        assert 0.17 < sum(v == "2" for v in first.values()) / len(users) < 0.23
        assert {user: pin.pinned(user).version for user in users} == first  # the same user, the same version
        assert pin.pinned().version == "1"  # no user id: the primary
        assert [p.version for p in pin.versions()] == ["1", "2"]
        fake.value = ServedModel("1", good, canary_version="2", canary_catalog_hash="f" * 64, canary_share=0.2)
        assert await pin.sync()  # the primary is fine
        assert {pin.pinned(user).version for user in users} == {"1"} and pin.canary is None
        fake.value = ServedModel("2", good)  # promoted: everyone on 2
        assert await pin.sync() and {pin.pinned(user).version for user in users} == {"2"}

    asyncio.run(scenario())
