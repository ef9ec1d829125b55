"""Node authentication without a network: the ``node-ids`` binding and what it refuses.

The loopback test (``tests/deploy/test_loopback.py``) runs the same rules with real
processes and Flower's ``--enable-supernode-auth``; these check each rule exactly, in
milliseconds, on the fake Grid of ``test_deploy_strategy``.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("flwr")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from fmtl_lightning.config import ConfigError, parse_config  # noqa: E402
from fmtl_lightning.deploy.auth import format_node_ids, parse_node_ids  # noqa: E402
from fmtl_lightning.deploy.server_app import DeployedRun, node_bindings  # noqa: E402
from fmtl_lightning.deploy.strategy import FMTLStrategy  # noqa: E402
from fmtl_lightning.deploy.tls import write_node_key  # noqa: E402
from fmtl_lightning.engine import ServerEngine  # noqa: E402
from tests.deploy.test_deploy_strategy import (  # noqa: E402
    CFG,
    NODE_CONFIG,
    FakeGrid,
    _task_identity,  # noqa: F401 (autouse fixture)
    good_node,
    plan,  # noqa: F401 (fixture)
)

CLIENTS = ["c00", "c01", "c02"]


def test_node_ids_parse_and_refuse_bad_entries_by_name():
    ids = parse_node_ids("c00=101, c01=102 c02=103", CLIENTS)
    assert ids == {"c00": 101, "c01": 102, "c02": 103}
    assert parse_node_ids(format_node_ids(ids), CLIENTS) == ids
    assert parse_node_ids("", CLIENTS) == {}
    for text, words in (
        ("c00:101", "'c00:101' is not CLIENT=NODE_ID"),
        ("c00=-1", "'c00=-1' is not CLIENT=NODE_ID"),
        ("c09=101", "client 'c09' is not in the YAML"),
        ("c00=101,c00=102", "client 'c00' is bound twice"),
        ("c00=101,c01=101", "node 101 is bound to two clients"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_node_ids(text, CLIENTS)


def test_node_auth_on_needs_every_client_bound_off_binds_what_is_given():
    cfg = parse_config(copy.deepcopy(CFG))
    with pytest.raises(ConfigError, match="binds no node to c01, c02, and 'node-auth' is on"):
        node_bindings(cfg, True, "c00=101")
    assert node_bindings(cfg, True, "c00=101,c01=102,c02=103") == {"c00": 101, "c01": 102,
                                                                   "c02": 103}  # fmt: skip
    assert node_bindings(cfg, False, "") is None
    assert node_bindings(cfg, False, "c00=101") == {"c00": 101}
    with pytest.raises(ConfigError, match="'node-auth': expected true or false"):
        node_bindings(cfg, "yes", "")


def test_a_node_claiming_a_client_bound_to_another_key_is_refused(plan):  # noqa: F811
    NODE_CONFIG[104] = {"client-id": "c00", "width": 1.0, "tasks": "digits/digit"}  # a thief
    NODE_CONFIG[105] = {"client-id": "c02", "width": 0.25, "tasks": "digits/parity"}  # unbound
    try:
        grid = FakeGrid({n: good_node(n) for n in (104, 101, 102, 103, 105)})
        s = FMTLStrategy(ServerEngine(plan, "unused"), reply_timeout=5.0,
                         node_ids={"c00": 101, "c01": 102, "c02": 103})  # fmt: skip
        s.register(grid)
    finally:
        NODE_CONFIG.pop(104)
        NODE_CONFIG.pop(105)
    assert {n: v.client.client_id for n, v in s.nodes.items()} == {101: "c00", 102: "c01",
                                                                   103: "c02"}  # fmt: skip
    assert s.refused == {
        104: "node 104 claims client 'c00', which is bound to the key of node 101 "
        "(run config 'node-ids')",
        105: "node 105 claims client 'c02', which is bound to the key of node 103 "
        "(run config 'node-ids')",
    }


def test_a_bound_node_wider_than_its_plan_is_refused(plan, tmp_path):  # noqa: F811
    NODE_CONFIG[106] = {"client-id": "c01", "width": 1.0, "tasks": "digits/digit"}
    try:
        grid = FakeGrid({106: good_node(106), 101: good_node(101)})
        run = DeployedRun(parse_config(copy.deepcopy(CFG)), tmp_path / "run", reply_timeout=5.0,
                          node_ids={"c00": 101, "c01": 106, "c02": 103})  # fmt: skip
        summary = run.run(grid, 1, 1, 0.0)
    finally:
        NODE_CONFIG.pop(106)
    assert summary["refused_nodes"] == {
        "106": "client 'c01' (node 106): width 1 is wider than the 0.5 the run config gives it"
    }
    assert list(summary["nodes"]) == ["c00"] and summary["per_round"][0]["accepted"] == ["c00"]


def test_node_keys_are_ec_p384_in_the_openssh_formats_flower_reads(tmp_path):
    k = write_node_key(tmp_path, "c00")
    priv = serialization.load_ssh_private_key(k.private.read_bytes(), None)
    pub = serialization.load_ssh_public_key(k.public.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert pub == priv.public_key()
    assert oct(k.private.stat().st_mode & 0o777) == "0o600"
