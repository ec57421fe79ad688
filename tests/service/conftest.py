"""Gateway app wired to fakes through dependency overrides (no lifespan: nothing real is opened)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.catalog import Pinned
from service.deps import get_history, get_readiness, get_recommender
from service.recommender import Recommender
from service.schemas import Readiness
from service.settings import Settings
from tests.service.fakes import FakeBlocklist, FakeModel, FakeStore, pinned


@dataclass
class Gateway:
    app: FastAPI
    client: TestClient
    store: FakeStore
    model: FakeModel
    recommender: Recommender
    blocklist: FakeBlocklist = field(default_factory=FakeBlocklist)
    version_changes: list[int] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` whose labels include `labels` (e.g. every model_version's)."""
        return sum(sample.value for family in self.app.state.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())


def build_gateway(store: FakeStore | None = None, model: FakeModel | None = None,
                  pin: Pinned | None | str = "default", readiness: Readiness | None = None,
                  **settings: object) -> Gateway:
    """The real app and Recommender over fakes; Redis/Triton URLs point at closed ports."""
    cfg = Settings(redis_url="redis://127.0.0.1:9/0", triton_url="127.0.0.1:9", **settings)
    app = create_app(cfg)
    store = store if store is not None else FakeStore({"u1": [30]})
    model = model if model is not None else FakeModel()
    current = pinned() if pin == "default" else pin
    gw = Gateway(app, TestClient(app, raise_server_exceptions=False), store, model, None)  # type: ignore[arg-type]

    async def version_changed() -> None:
        gw.version_changes.append(1)

    gw.recommender = Recommender(store, model, lambda *_: current, app.state.metrics, cfg.history_len,
                                 on_version_change=version_changed, blocklist=gw.blocklist,
                                 max_banned_sids=cfg.max_banned_sids, new_item_share=cfg.new_item_share)
    ready = readiness or Readiness(ready=True, redis=True, triton=True, catalog=True, model_version="7")
    app.dependency_overrides[get_recommender] = lambda: gw.recommender
    app.dependency_overrides[get_history] = lambda: store
    app.dependency_overrides[get_readiness] = lambda: ready
    return gw


@pytest.fixture
def gateway() -> Gateway:
    return build_gateway()
