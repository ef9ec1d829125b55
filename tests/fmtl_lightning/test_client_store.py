"""A pool's memory does not grow with its clients beyond their index (issue 14, item 3).

Structural checks, no timings or RSS: client states live on disk, one file per client
in the checkpoint's per-client form, and only the clients in use have a store in RAM;
client images are index rows of the one shared dataset array, never copies.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtl_lightning.checkpoint import read_round
from fmtl_lightning.client_states import ClientStateError, ClientStates
from fmtl_lightning.clients import host_tag
from fmtl_lightning.config import parse_config
from fmtl_lightning.data import load_dataset
from fmtl_lightning.fed_data import ImageRows, images_to_tensor
from fmtl_lightning.run_artifacts import ClientStore
from fmtl_lightning.simulation import Simulation


def _cfg(small_cfg: dict, algorithm: str = "ditto") -> dict:
    small_cfg["clients"] = [{"count": 12, "tasks": ["digits/digit"], "width": 1.0}]
    small_cfg["data"]["samples_per_client"] = 20
    small_cfg["algorithm"] = {"name": algorithm}
    small_cfg["federation"].update(fraction=0.25, local_steps=2, eval_every=1)
    return small_cfg


def _stores_alive() -> int:
    gc.collect()
    return sum(type(o) is ClientStore for o in gc.get_objects())


def test_only_the_sampled_clients_states_are_in_ram_and_the_rest_on_disk(small_cfg, tmp_path):
    sim = Simulation(parse_config(_cfg(small_cfg)), tmp_path / "r", progress=False)
    pool = sim.pool
    assert isinstance(pool.stores, ClientStates) and pool.stores.root.parent == tmp_path / "r"
    assert pool.stores.resident_ids() == () and _stores_alive() == 0  # 12 clients, none in RAM
    chosen = sim.engine.assign(0)
    sampled = {a.client.client_id for a in chosen}
    assert len(sampled) == 3
    for a in chosen:
        pool.train(a.idx, a.ws, 0, a.received)
    # the sampled clients' states: resident, and written back to their files
    assert set(pool.stores.resident_ids()) == sampled and _stores_alive() == 3
    on_disk = {p.stem for p in pool.stores.root.glob("*.safetensors")}
    assert on_disk == sampled
    for cid in sampled:
        st = pool.stores[cid]
        assert st.personal and st.local  # Ditto: a personal model and its heads
        from safetensors.numpy import load_file

        saved = load_file(str(pool.stores.path(cid)))
        assert set(saved) == set(st.to_arrays())
        for k, v in st.to_arrays().items():
            np.testing.assert_array_equal(saved[k], v, err_msg=k)


def test_a_round_with_evaluation_keeps_at_most_resident_states(small_cfg, tmp_path):
    sim = Simulation(parse_config(_cfg(small_cfg)), tmp_path / "r", progress=False)
    sim.pool.stores = ClientStates(sim.pool.stores.root, [c.cid for c in sim.fed.clients],
                                   sim.pool.initial_store, resident=2)  # fmt: skip
    seen = []
    evaluate = sim.pool.evaluate

    def spy(*a, **k):  # every client is evaluated: never more than 2 stores in RAM
        seen.append(len(sim.pool.stores.resident_ids()))
        return evaluate(*a, **k)

    sim.pool.evaluate = spy  # type: ignore[method-assign]
    out = sim.run_round()
    assert len(seen) == 12 and max(seen) <= 2
    # after the checkpoint no state is held in RAM; the checkpoint has every client's
    # (round 1 writes all), equal to the pool's view of it
    assert sim.pool.stores.resident_ids() == () and _stores_alive() == 0
    _, files, _, _ = read_round(tmp_path / "r", 1)
    assert sorted(files) == sorted(c.cid for c in sim.fed.clients)
    for cid, arrays in files.items():
        want = sim.pool.stores.arrays(cid)
        assert set(arrays) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(arrays[k], v, err_msg=f"{cid} {k}")
    # an untrained client has no state file: its state is the initial model's entries
    idle = next(c for c in sim.fed.clients if c.cid not in out["clients"])
    assert not sim.pool.stores.path(idle.cid).exists()
    init = sim.pool.plan.initial_model
    for k, v in sim.pool.stores[idle.cid].personal.items():
        np.testing.assert_array_equal(v, init[k], err_msg=k)


def test_client_images_are_index_rows_of_one_shared_dataset_array(small_cfg, tmp_path):
    sim = Simulation(parse_config(_cfg(small_cfg, "fedper")), tmp_path / "r", progress=False)
    ds = load_dataset("digits", "train", small_cfg["data"].get("data_dir"))
    bases = set()
    for c in sim.fed.clients:
        for split in ("train", "test"):
            rows = c.inputs(split)
            assert isinstance(rows, ImageRows)  # an index, not a copy of the images
            assert rows.idx.dtype == np.int64 and rows.idx.ndim == 1
            bases.add(id(rows.images))
        # read as the same tensor the model always got, built from the shared rows
        tr = c.inputs("train")
        want = images_to_tensor(ds.images[c.spec.train_idx], ds.mean, ds.std)
        assert torch.equal(c.x_train, want) and c.num_train == len(c.spec.train_idx)
        assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vars(c).values())
        assert not np.shares_memory(c.x_train.numpy(), tr.images)  # read: a fresh tensor
    # every client, both splits: one array object, the whole dataset split as loaded
    assert len(bases) == 1
    base = sim.fed.clients[0].inputs("train").images
    assert base.shape == ds.images.shape and np.array_equal(base, ds.images)
    assert all(np.shares_memory(c.inputs(s).images, base)
               for c in sim.fed.clients for s in ("train", "test"))  # fmt: skip
    # replacing a field (e.g. the local baseline's edge flag) keeps the rows, copies nothing
    c = sim.fed.clients[0]
    assert c.replace(edge=True).inputs("train") is c.inputs("train")


def test_state_files_and_their_errors(small_cfg, tmp_path):
    sim = Simulation(parse_config(_cfg(small_cfg, "fedper")), tmp_path / "r", progress=False)
    cid = sim.run_round()["clients"][0]
    stores = sim.pool.stores
    stores.path(cid).write_bytes(b"not safetensors")
    with pytest.raises(ClientStateError, match=str(stores.path(cid))):
        stores[cid]
    with pytest.raises(ClientStateError, match="'nobody'"):
        stores.arrays("nobody")
    assert "nobody" not in stores and stores.get("nobody") is None
    with pytest.raises(ClientStateError, match="resident"):
        ClientStates(tmp_path / "x", ["a"], lambda _: ClientStore(), resident=0)
    root = stores.root
    sim.close()  # the live state files go; the checkpoints keep them
    assert not root.exists()


def test_a_killed_runs_state_dir_is_removed_by_the_next_pool(small_cfg, tmp_path):
    run = tmp_path / "r"
    host = host_tag()
    stale = run / f".client_state.{host}.999999999.abc"  # no such process on this host
    other = run / ".client_state.elsewhere.999999999.abc"  # another machine's: kept
    stale.mkdir(parents=True)
    (stale / "c00.safetensors").write_bytes(b"x")
    live = run / f".client_state.{host}.{os.getpid()}.keep"  # a pool of a live process
    live.mkdir()
    other.mkdir()
    sim = Simulation(parse_config(_cfg(small_cfg, "fedper")), run, progress=False)
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert sim.pool.stores.root.name.startswith(f".client_state.{host}.{os.getpid()}.")


def test_resume_restores_every_clients_state_file(small_cfg, tmp_path):
    cfg = parse_config(_cfg(small_cfg, "fedper"))
    sim = Simulation(cfg, tmp_path / "r", progress=False)
    sim.run()  # 2 rounds
    again = Simulation.resume(tmp_path / "r", progress=False)
    assert again.pool.stores.root != sim.pool.stores.root
    assert Path(again.pool.stores.root).is_dir()
    for c in sim.fed.clients:
        a, b = sim.pool.stores.arrays(c.cid), again.pool.stores.arrays(c.cid)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{c.cid} {k}")
    assert again.pool.stores.resident_ids() == ()
