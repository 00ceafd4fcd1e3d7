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
