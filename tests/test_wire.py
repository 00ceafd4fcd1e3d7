"""The wire as others write it: foreign clients, operators' servers, hostile bytes, limits (NATS side).

Each test starts its own nats-server; a foreign client is plain nats-py on plain asyncio in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import keyedbus


def test_an_untested_nats_py_version_is_refused_naming_the_supported_range() -> None:
    from keyedbus._backends import _natspy

    for version in ("2.15.1", "3.0.0"):
        with pytest.raises(keyedbus.ConnectionFailedError) as info:
            _natspy.check_version(version)
        assert str(info.value) == (
            f"nats-py {version} is installed, but keyedbus supports nats-py >=2.16,<3 only (it reads "
            "nats-py's subscription queues directly): pip install 'nats-py>=2.16,<3'"
        )
    _natspy.check_version()  # the installed one is supported
    _natspy.check_version("2.16.0rc1")


def test_jetstream_and_core_nats_share_a_connection_layer_without_importing_each_other() -> None:
    code = "import sys, keyedbus._backends.jetstream; print('keyedbus._backends.nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
