"""A foreign NATS client for tests: plain nats-py on plain asyncio, run in its own process.

    python tests/foreign_nats.py URL 'JSON list of operations'

Runs the operations in order and prints one JSON line per result. Operations ("op"):
publish (JetStream publish, returns the stored sequence or the error), core_publish, add_stream,
update_stream, stream_info, delete_stream, add_consumer, consumer_info, delete_consumer, get_msg, and
pull (read a durable consumer for "seconds"), edit_stream, edit_consumer (change the settings in "set",
keep the rest), read_core (subscribe to a subject, print {"ready": true}, then collect `count` messages).
Data is given as text ("data") or base64 ("data_b64"); errors are returned as {"error": ..., "code": ...}.
It stands in for a Go or JavaScript client or an operator's `nats` command line.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sys
from typing import Any

import nats
import nats.errors
import nats.js.api
import nats.js.errors


def _data(op: dict[str, Any]) -> bytes:
    if "data_b64" in op:
        return base64.b64decode(op["data_b64"])
    return str(op.get("data", "")).encode()


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(value), default=str))


async def _run(nc: Any, op: dict[str, Any]) -> Any:
    js = nc.jetstream()
    kind = op["op"]
    if kind == "publish":
        ack = await js.publish(op["subject"], _data(op), headers=op.get("headers"), timeout=10)
        return {"seq": ack.seq, "stream": ack.stream}
    if kind == "core_publish":
        await nc.publish(op["subject"], _data(op), headers=op.get("headers"))
        await nc.flush()
        return {"ok": True}
    if kind in ("add_stream", "update_stream"):
        config = nats.js.api.StreamConfig(**op["config"])
        info = await (js.add_stream(config) if kind == "add_stream" else js.update_stream(config))
        return _plain(info.config)
    if kind == "edit_stream":  # what `nats stream edit` does: change some settings, keep the rest
        current = (await js.stream_info(op["name"])).config
        info = await js.update_stream(dataclasses.replace(current, **op["set"]))
        return _plain(info.config)
    if kind == "edit_consumer":
        current = (await js.consumer_info(op["stream"], op["name"])).config
        info = await js.add_consumer(op["stream"], dataclasses.replace(current, **op["set"]))
        return _plain(info.config)
    if kind == "stream_info":
        info = await js.stream_info(op["name"])
        return {"config": _plain(info.config), "state": _plain(info.state)}
    if kind == "delete_stream":
        return {"ok": await js.delete_stream(op["name"])}
    if kind == "add_consumer":
        info = await js.add_consumer(op["stream"], nats.js.api.ConsumerConfig(**op["config"]))
        return _plain(info.config)
    if kind == "consumer_info":
        return _plain(await js.consumer_info(op["stream"], op["name"]))
    if kind == "delete_consumer":
        return {"ok": await js.delete_consumer(op["stream"], op["name"])}
    if kind == "get_msg":
        msg = await js.get_msg(op["stream"], op["seq"])
        return {"data_b64": base64.b64encode(msg.data or b"").decode(), "headers": msg.headers or {}}
    if kind == "pull":  # another reader of a group: fetch from its durable consumer, ack what it gets
        psub = await js.pull_subscribe_bind(durable=op["durable"], stream=op["stream"])
        print(json.dumps({"ready": True}), flush=True)
        fetched = 0
        deadline = asyncio.get_running_loop().time() + op["seconds"]
        while asyncio.get_running_loop().time() < deadline:
            try:
                for msg in await psub.fetch(1, timeout=1):
                    await msg.ack()
                    fetched += 1
            except nats.errors.TimeoutError:
                pass
        return {"fetched": fetched}
    if kind == "read_core":
        sub = await nc.subscribe(op["subject"])
        await nc.flush()
        print(json.dumps({"ready": True}), flush=True)
        received = []
        for _ in range(op["count"]):
            msg = await sub.next_msg(timeout=op.get("timeout", 30))
            received.append({"data_b64": base64.b64encode(msg.data).decode(), "headers": msg.headers or {}})
        return received
    raise ValueError(f"unknown op {kind!r}")


async def main(url: str, ops: list[dict[str, Any]]) -> None:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        for op in ops:
            try:
                result = await _run(nc, op)
            except nats.js.errors.APIError as exc:
                result = {"error": str(exc), "code": exc.err_code, "description": exc.description}
            except nats.errors.Error as exc:
                result = {"error": f"{type(exc).__name__}: {exc}", "code": None}
            print(json.dumps(result), flush=True)
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
