"""ONEREC_NEW_ITEM_SHARE on the gateway (fakes): a new item (popularity 0) sharing a generated item's first code
follows it in the answer, within the quota; off by default; counted per version; never a blocked one."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from onerec.tokenizer.catalog import Catalog
from service.catalog import Pinned
from service.settings import Settings
from tests.service.conftest import build_gateway
from tests.service.fakes import POPULARITY, SIDS, VIDEOS

NEW = 80  # a video `catalog add` placed at (1, 2)'s sibling (1, 3): it shares (1, 0)'s first code


def with_new_item() -> Pinned:
    catalog = Catalog.build(np.array([*VIDEOS, NEW]), np.array([*SIDS, [1, 3]]), np.array([*POPULARITY, 0]),
                            num_codes=4)
    return Pinned("7", catalog, 4, True, None, True)


def videos(body: dict) -> list[int]:
    return [item["video_id"] for item in body["items"]]


def test_off_by_default_the_new_item_is_never_served():
    gateway = build_gateway(pin=with_new_item())
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude_seen": False}).json()
    assert NEW not in videos(body) and gateway.metric("onerec_gateway_new_items_total") == 0


def test_a_share_places_the_new_item_after_the_generated_item_sharing_its_prefix():
    gateway = build_gateway(pin=with_new_item(), new_item_share=0.2)
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude_seen": False}).json()
    # the model answers (0,1) (1,0) (0,1) | (1,1) ...: 20, then 30 at (1,0), and 80 under the prefix (1,) right after
    assert body["source"] == "model" and videos(body)[:3] == [20, 30, NEW] and len(set(videos(body))) == 5
    assert gateway.metric("onerec_gateway_new_items_total", model_version="7") == 1


def test_a_blocked_new_item_is_not_placed():
    gateway = build_gateway(pin=with_new_item(), new_item_share=0.2)
    gateway.blocklist.ids = {NEW}
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude_seen": False}).json()
    assert NEW not in videos(body) and gateway.metric("onerec_gateway_new_items_total") == 0


@pytest.mark.parametrize("value", ["-0.1", "1.5", "x"])
def test_the_share_is_checked(value: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ONEREC_NEW_ITEM_SHARE", value)
    with pytest.raises(ValidationError, match="new_item_share"):
        Settings()
