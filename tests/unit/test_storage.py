"""Storage past one node: a local artifacts path is refused with the reason, a shared filesystem is taken."""

import pytest
from fastapi.testclient import TestClient

from jobs.jobdir import filesystem_of, shared_storage_problem
from runner.queue import Node
from runner.server import create_app

MOUNTS = """\
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs-12ab.efs.eu-west-1.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
my-bucket /mnt/gcs fuse.gcsfuse rw 0 0
/dev/sdb /mnt/shared/scratch xfs rw 0 0
/dev/sdc /mnt/with\\040space ext4 rw 0 0
"""


def test_the_mount_that_holds_a_path_is_the_longest_prefix():
    assert filesystem_of("/mnt/shared/runner/artifacts", MOUNTS) == ("/mnt/shared", "nfs4")
    assert filesystem_of("/mnt/shared/scratch/x", MOUNTS) == ("/mnt/shared/scratch", "xfs")
    assert filesystem_of("/mnt/sharedother", MOUNTS) == ("/", "ext4")  # a prefix of the name is not a parent
    assert filesystem_of("/mnt/with space/a", MOUNTS) == ("/mnt/with space", "ext4")


@pytest.mark.parametrize("path,ok", [("/mnt/shared/runner", True), ("/mnt/gcs/runner", True),
                                     ("/home/me/.runner", False), ("/mnt/shared/scratch/runner", False)])
def test_more_than_one_node_needs_a_shared_filesystem(path, ok, monkeypatch):
    monkeypatch.delenv("RUNNER_SHARED_STORAGE", raising=False)
    assert shared_storage_problem(path, 1, MOUNTS) is None  # one node: any path
    why = shared_storage_problem(path, 3, MOUNTS)
    assert (why is None) is ok
    if not ok:
        assert "3 nodes" in why and path in why and "cluster/README.md" in why
    assert "mountpoint-s3" in shared_storage_problem("s3://bucket/runner", 2, MOUNTS)
    monkeypatch.setenv("RUNNER_SHARED_STORAGE", "1")  # the operator vouches for it
    assert shared_storage_problem(path, 3, MOUNTS) is None


class Cluster:
    """Ray at the edge: a cluster of n nodes that takes every submission."""

    def __init__(self, n):
        self.n = n

    def nodes(self):
        return [Node(f"n{i}", 4, 1) for i in range(self.n)]

    def submit(self, *a, **k):
        pass

    def status(self, sid):
        return "RUNNING", ""

    def stop(self, sid):
        pass


RECIPE = "name: r\nmodel: {name: m}\ntask: classification\ndata: {train: t.jsonl}\n"


@pytest.mark.parametrize("nodes", [1, 2])
def test_submit_to_a_multi_node_cluster_refuses_a_local_artifacts_path(tmp_path, monkeypatch, nodes):
    monkeypatch.delenv("RUNNER_SHARED_STORAGE", raising=False)
    app = create_app(tmp_path / "home", backend=Cluster(nodes), interval=3600)
    with TestClient(app) as c:
        r = c.post("/jobs", json={"recipe": RECIPE, "base_dir": str(tmp_path)})
        if nodes == 1:
            assert r.status_code == 201, r.text
        else:
            assert r.status_code == 422 and "the cluster has 2 nodes" in r.json()["detail"]
            assert "local filesystem" in r.json()["detail"]
            assert c.get("/jobs").json()["total"] == 0  # nothing queued, no folder made
            assert not any((tmp_path / "home" / "artifacts").iterdir())


def test_runner_artifacts_puts_job_folders_apart_from_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_ARTIFACTS", str(tmp_path / "shared" / "artifacts"))
    app = create_app(tmp_path / "home", backend=Cluster(1), interval=3600)
    with TestClient(app) as c:
        job = c.post("/jobs", json={"recipe": RECIPE, "base_dir": str(tmp_path)}).json()
    assert (tmp_path / "shared" / "artifacts" / job["id"] / "recipe.yaml").exists()
    assert (tmp_path / "home" / "runner.db").exists() and not (tmp_path / "home" / "artifacts" / job["id"]).exists()
