"""The shortcuts keyedbus takes around nats-py's slower paths give exactly what nats-py's own would."""

from __future__ import annotations

import pytest

pytest.importorskip("nats")


@pytest.mark.parametrize(
    "reply",
    [
        # the form nats-server sends without a domain
        "$JS.ACK.KB_orders.kb_orders.3.48213.48190.1764527000123456789.1787",
        # with domain and account hash (and the random token newer servers add)
        "$JS.ACK.hub.ACCHASH.KB_orders.kb_orders.1.7.7.1764527000123456789.0.a8Fz",
        "$JS.ACK._.ACCHASH.KB_orders.kb_orders.12.900.650.1764527000123456789.41",
    ],
)
def test_delivery_info_reads_what_nats_py_metadata_reads(reply: str) -> None:
    from nats.aio.msg import Msg

    from keyedbus._backends import _natspy

    msg = Msg(None, subject="orders", reply=reply, data=b"x", headers=None)  # type: ignore[arg-type]
    meta = Msg(None, subject="orders", reply=reply, data=b"x", headers=None).metadata  # type: ignore[arg-type]
    assert _natspy.delivery_info(msg) == (meta.sequence.stream, meta.num_delivered, meta.num_pending)


def _nats_py_command(subject: str, data: bytes, headers: dict[str, str] | None) -> bytes:
    """What nats-py's own publish buffers for this message (its `_send_publish`, run without a server)."""
    import nats.aio.client

    nc = nats.aio.client.Client()
    step = nc._send_publish(subject, "", data, len(data), headers)
    with pytest.raises(StopIteration):  # nothing in it waits: it only appends to the outgoing buffer
        step.send(None)
    [command] = nc._pending
    return bytes(command)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Aggregate-ID": "order-1", "Nats-Msg-Id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"},
        {"Trace": "  padded\tvalue \t", "Vertical": "\x0bstripped by str.strip()\x0c"},
        {"Line": "one\r\ntwo\nthree\rfour", "Unicode": "größe ✓"},
        {" Spaced-Name ": "v", "   ": "an empty name is skipped", "Empty": ""},
        {},
    ],
)
def test_core_publish_commands_are_what_nats_py_would_send_byte_for_byte(headers: dict[str, str]) -> None:
    from keyedbus._backends import _natspy

    data = b"payload \x00\xff"
    command, size = _natspy.publish_command("orders.eu", data, headers)
    assert command == _nats_py_command("orders.eu", data, headers or None)
    if headers:  # HPUB <subject> <reply> <header bytes> <total bytes>: the size the server counts
        assert size == int(command.split(b"\r\n", 1)[0].split()[-1])
        assert size == _natspy.encoded_size(data, headers)
    else:
        assert size == len(data)
    again, _ = _natspy.publish_command("orders.eu", data, headers)  # names now known valid: same bytes
    assert again == command
    # Nats-Msg-Id given apart is sent as the dict merge {**headers, "Nats-Msg-Id": ...} would send it.
    for message_id in ("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", " chosen\r\nid "):
        merged = {**headers, "Nats-Msg-Id": message_id}
        with_id, with_id_size = _natspy.publish_command("orders.eu", data, headers, message_id)
        assert with_id == _nats_py_command("orders.eu", data, merged)
        assert with_id_size == _natspy.encoded_size(data, merged)


def test_a_header_name_nats_py_refuses_is_refused_the_same_way() -> None:
    import nats.errors

    from keyedbus._backends import _natspy

    with pytest.raises(nats.errors.BadHeaderError):
        _natspy.publish_command("orders", b"x", {"Bad Name": "v"})
    with pytest.raises(nats.errors.BadHeaderError):
        _nats_py_command("orders", b"x", {"Bad Name": "v"})


@pytest.mark.parametrize("how", ["ack", "nak", "term", "in_progress", "nak:2.5"])
def test_settles_written_directly_are_what_nats_py_msg_methods_send(how: str) -> None:
    import nats.aio.client
    import nats.errors
    from nats.aio.msg import Msg

    from keyedbus._backends import _natspy

    reply = "$JS.ACK.KB_orders.kb_orders.1.7.7.1764527000123456789.0"
    nc = nats.aio.client.Client()
    nc._max_pending_size = 1 << 20  # as connect() sets it: a publish before connecting is buffered
    theirs = Msg(nc, subject="orders", reply=reply, data=b"x", headers=None)
    # "nak:<seconds>" is a nak with a redelivery delay (a parked key's deferred backlog)
    step = theirs.nak(delay=float(how[4:])) if how.startswith("nak:") else getattr(theirs, how)()
    with pytest.raises(StopIteration):  # nothing in it waits: it only appends to the outgoing buffer
        step.send(None)
    ours = Msg(nc, subject="orders", reply=reply, data=b"x", headers=None)
    assert _natspy.settle_command(ours, how) == bytes(nc._pending[0])
    _natspy.settled(ours, how)
    assert ours._ackd == theirs._ackd
    if how != "in_progress":  # settled once: a second settle is refused as nats-py refuses it
        with pytest.raises(nats.errors.MsgAlreadyAckdError):
            _natspy.settle_command(ours, "ack")
    with pytest.raises(nats.errors.NotJSMessageError):
        _natspy.settle_command(Msg(nc, subject="orders", reply="", data=b"x", headers=None), how)
