"""A real `bridge serve` accepts valid JSON that no float holds (`1e999`, a 30-digit integer)
and delivers it, digits as written, to an HTTP receiver and to Kafka (Tansu)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.bridge import WEBHOOK, eventually
from tests.helpers.process import BridgeProcess, free_port
from tests.helpers.receiver import Receiver
from tests.helpers.tansu import Tansu
from tests.integration.test_kafka import consume, create_topics, prefix, tansu, tansu_bin

__all__ = ["tansu", "tansu_bin"]  # the broker fixtures, shared with test_kafka

CONFIG = """
server: {listen: "${BRIDGE_LISTEN}"}
storage: sqlite:///bridge.db
sinks:
  erp:
    type: http
    url: ${RECEIVER}/in
  kafka:
    type: kafka
    bootstrap_servers: ${BOOTSTRAP}
    topic: ${TOPIC}
    enable_idempotence: false  # Tansu's in-memory store refuses InitProducerId
routes:
  # A condition on the number itself: 1e999 is greater than any float.
  - name: huge
    kind: order
    when: {path: $.total, gt: 1.0e+308}
    to: [erp, kafka]
  - name: templated
    kind: order
    when: {path: $.n, equals: 123456789012345678901234567890}
    to: erp
    message: '{"t": {{ item.total | json }}, "n": {{ item.n | json }}, "s": "{{ item.total }}"}'
"""

BODY = (b'{"order": [{"uuid": "n1", "total": 1e999, "n": 123456789012345678901234567890, '
        b'"lines": [{"qty": -2.5E+400}, 1.5]}]}')
ITEM_JSON = ('{"lines":[{"qty":-2.5E+400},1.5],"n":123456789012345678901234567890,'
             '"total":1e999,"uuid":"n1"}')


async def test_numbers_no_float_holds_reach_http_and_kafka_as_written(
        tmp_path: Path, receiver: tuple[Receiver, str], tansu: Tansu) -> None:
    rec, url = receiver
    topic = prefix()
    await create_topics(tansu.bootstrap, topic, partitions=1)
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG)
    env = {"RECEIVER": url, "BOOTSTRAP": tansu.bootstrap, "TOPIC": topic}
    async with BridgeProcess(config, tmp_path / "bridge.log", env) as bridge:
        await bridge.start(free_port())
        async with aiohttp.ClientSession() as session, session.post(
                bridge.url + WEBHOOK, data=BODY) as resp:
            answer: dict[str, Any] = await resp.json()
            assert resp.status == 200, answer
        assert answer["accepted"] == 1 and len(answer["batch_id"]) == 32

        await rec.wait_for(2, timeout=30)
        bodies = {r.json().get("route", "templated"): r.body.decode() for r in rec.requests}
        assert f'"data":{ITEM_JSON}}}' in bodies["huge"]
        assert bodies["templated"] == ('{"t": 1e999, "n": 123456789012345678901234567890, '
                                       '"s": "1e999"}')
        records = await consume(tansu.bootstrap, [topic], 1)
        assert len(records) == 1 and records[0].value is not None
        value = records[0].value.decode()
        assert f'"data":{ITEM_JSON}}}' in value
        assert json.loads(value)["data"]["n"] == 123456789012345678901234567890



async def test_a_null_order_list_is_accepted_with_the_unknown_key_warning(
        tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    config = tmp_path / "routes.yaml"
    config.write_text('server: {listen: "${BRIDGE_LISTEN}"}\nstorage: sqlite:///bridge.db\n'
                      'sinks:\n  erp: {type: http, url: "${RECEIVER}/in"}\n'
                      "routes:\n  - {name: all, to: erp}\n")
    async with BridgeProcess(config, tmp_path / "bridge.log", {"RECEIVER": url}) as bridge:
        await bridge.start(free_port())
        async with aiohttp.ClientSession() as session, session.post(
                bridge.url + WEBHOOK, data=b'{"order": null}') as resp:
            assert resp.status == 200
            assert (await resp.json())["accepted"] == 0
        log = tmp_path / "bridge.log"

        async def warned() -> bool:
            return "accepted as an empty batch" in log.read_text()
        await eventually(warned, timeout=10, what="the empty-batch warning")
        line = next(json.loads(x) for x in log.read_text().splitlines()
                    if "accepted as an empty batch" in x)
        assert line["level"] == "warning" and line["keys"] == ["order"]
    assert rec.requests == []
