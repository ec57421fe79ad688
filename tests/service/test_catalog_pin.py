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
