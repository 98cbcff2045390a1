"""The cluster as Ray's autoscaler sees it, read from Ray's GCS: each node's resources in total and free now (so
that other users' actors and tasks count), its node type and whether it is being drained, the node types the
autoscaler can start with their max counts, the launches pending, and the resource request the runner made.

Node types come from the cluster config the autoscaler reports into the GCS where it does (autoscaler v2 on KubeRay),
else from the cluster's own config file, named by RUNNER_CLUSTER_CONFIG: the cluster launcher's YAML (on the head,
~/ray_bootstrap_config.yaml) or a KubeRay RayCluster manifest. Without either, the cluster is the nodes it has.

The runner asks for nodes with one cluster-wide resource request (what `ray.autoscaler.sdk.request_resources` sets:
each call replaces the last), written both where autoscaler v2 reads it (the GCS's cluster resource constraint) and
where v1 does (the GCS key-value store). Ray fits a request against the nodes' totals, not what is free, so the
request holds the bundles in use now plus those of the jobs waiting for a node; it is emptied when no job waits.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.jobdir import first_line
from runner.queue import Node, NodeType

V1_REQUEST_KEY = b"autoscaler_resource_request"  # ray_constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL
STATUS = {0: "UNSPECIFIED", 1: "RUNNING", 2: "DEAD", 3: "IDLE", 4: "DRAINING"}
MAX_CONFIG = 1 << 20  # a cluster config file bigger than this is not one
RPC_TIMEOUT_S = 3  # a GCS call's limit: a pass of the dispatcher waits no longer on it


class ConfigError(ValueError):
    """The cluster config file cannot give node types; the message names the file, the key and what is accepted."""


@dataclass
class ClusterView:
    nodes: list[Node]  # alive nodes, their totals
    free: list[Node]  # the same nodes, what Ray says is available on each now
    types: list[NodeType] = field(default_factory=list)  # worker node types, counts = alive + pending launches
    draining: set[str] = field(default_factory=set)  # node ids being drained (a preemption, a scale-down)
    pending: dict[str, int] = field(default_factory=dict)  # node type -> nodes being launched
    request: list[dict] = field(default_factory=list)  # the cluster's resource request now: [{resources, count}]
    idle_s: dict[str, float] = field(default_factory=dict)  # node id -> seconds idle


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{what}: {v!r:.60} is not a number")
    text = str(v).strip()
    try:
        x = float(text[:-1]) / 1000 if text.endswith("m") else float(text)  # Kubernetes' "500m" CPUs
    except ValueError:
        raise ConfigError(f"{what}: {text[:60]!r} is not a number") from None
    if not 0 <= x < 1e9:
        raise ConfigError(f"{what}: {text[:60]!r} is out of range")
    return x


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _name(v, what: str) -> str:
    if not isinstance(v, str) or not NAME.fullmatch(v):
        raise ConfigError(f"{what}: {str(v)[:60]!r} is not a node type's name (letters, digits, '.', '_', '-', at "
                          "most 100)")
    return v


def _map(v, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{what}: a mapping is expected, not {type(v).__name__}")
    return v


def node_types(doc, source: str = "the cluster config") -> list[NodeType]:
    """The worker node types of a cluster launcher YAML (available_node_types, less the head's) or a KubeRay
    RayCluster (spec.workerGroupSpecs), with their resources and max counts."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a YAML mapping is expected, not {type(doc).__name__}")
    out: list[NodeType] = []
    if doc.get("kind") == "RayCluster":
        groups = _map(doc.get("spec"), f"{source}: spec").get("workerGroupSpecs") or []
        if not isinstance(groups, list):
            raise ConfigError(f"{source}: spec.workerGroupSpecs must be a list")
        for i, g in enumerate(groups):
            where = f"{source}: spec.workerGroupSpecs[{i}]"
            if not isinstance(g, dict) or "groupName" not in g:
                raise ConfigError(f"{where}: a group with a groupName is expected")
            params = _map(g.get("rayStartParams"), f"{where}.rayStartParams")
            pod = _map(_map(g.get("template"), f"{where}.template").get("spec"), f"{where}.template.spec")
            containers = pod.get("containers") or []
            if not isinstance(containers, list):
                raise ConfigError(f"{where}.template.spec.containers must be a list")
            first = _map(containers[0] if containers else {}, f"{where}.template.spec.containers[0]")
            limits = _map(_map(first.get("resources"), f"{where} resources").get("limits"), f"{where} limits")
            cpus = params.get("num-cpus", limits.get("cpu", 0))
            gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
            out.append(NodeType(_name(g["groupName"], f"{where}.groupName"), _number(cpus, f"{where} CPUs"),
                                _number(gpus, f"{where} GPUs"),
                                int(_number(g.get("maxReplicas", 0), f"{where}.maxReplicas"))))
        return out
    kinds = doc.get("available_node_types")
    if not isinstance(kinds, dict):
        raise ConfigError(f"{source}: neither a RayCluster (kind: RayCluster) nor a cluster launcher YAML "
                          "(available_node_types)")
    head = doc.get("head_node_type")
    for name, spec in kinds.items():
        where = f"{source}: available_node_types.{str(name)[:60]}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: a mapping is expected")
        if name == head:
            continue
        res = spec.get("resources") or {}
        if not isinstance(res, dict):
            raise ConfigError(f"{where}.resources: a mapping is expected")
        top = spec.get("max_workers", doc.get("max_workers", 0))
        out.append(NodeType(_name(name, where), _number(res.get("CPU", 0), f"{where}.resources.CPU"),
                            _number(res.get("GPU", 0), f"{where}.resources.GPU"),
                            int(_number(top, f"{where}.max_workers"))))
    return out


def read_config(path: str | os.PathLike) -> list[NodeType]:
    import yaml

    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG + 1)
    except OSError as e:
        raise ConfigError(f"RUNNER_CLUSTER_CONFIG={str(path)[:200]}: cannot be read ({e.strerror})") from None
    if len(data) > MAX_CONFIG:
        raise ConfigError(f"RUNNER_CLUSTER_CONFIG={str(path)[:200]}: larger than {MAX_CONFIG} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ConfigError(f"RUNNER_CLUSTER_CONFIG={str(path)[:200]}: not YAML ({first_line(e)})") from None
    return node_types(doc, f"RUNNER_CLUSTER_CONFIG={str(path)[:200]}")


class Gcs:
    """Ray's GCS at `address` (host:port), through Ray's own client; RAY_AUTH_TOKEN from the environment where Ray's
    token auth is on."""

    def __init__(self, address: str, config: str | None = None, max_age: float = 1.0):
        self.address = address
        self.config = config
        self.max_age = max_age
        self._client = None
        self._view: tuple[float, ClusterView] | None = None
        self._lock = threading.Lock()
        self._config_types: tuple[float, list[NodeType]] | None = None
        self.requested: list[dict] | None = None  # the runner's own bundles, as last asked for
        self.written: list[dict] | None = None  # the whole request as the runner last wrote it
        self.others: list[dict] = []  # what others asked for, kept beside the runner's
        self.config_error: str | None = None  # why the config file, rewritten, could not be read again

    @property
    def client(self):
        if self._client is None:
            from ray._raylet import GcsClient

            self._client = GcsClient(address=self.address)
        return self._client

    def _types(self) -> list[NodeType]:
        """The node types with their max counts: the GCS's cluster config where the autoscaler reported one, else
        the config file (read again when it changes)."""
        import ray._raylet as raylet
        from ray.core.generated import autoscaler_pb2

        raw = self.client.internal_kv_get(raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
                                          raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(), timeout=RPC_TIMEOUT_S)
        if raw:
            cfg = autoscaler_pb2.ClusterConfig.FromString(raw)
            return [NodeType(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                             int(g.max_count)) for g in cfg.node_group_configs if g.max_count != 0]
        if not self.config:
            return []
        path = Path(self.config).expanduser()
        mtime = path.stat().st_mtime if path.exists() else 0.0
        if self._config_types is None or self._config_types[0] != mtime:
            try:
                self._config_types, self.config_error = (mtime, read_config(path)), None
            except ConfigError as e:
                if self._config_types is None:
                    raise
                # rewritten badly: the last good types stand, and the dispatcher says why once
                self._config_types, self.config_error = (mtime, self._config_types[1]), str(e)
        return self._config_types[1]

    def view(self) -> ClusterView:
        with self._lock:
            if self._view and time.monotonic() - self._view[0] < self.max_age:
                return self._view[1]
            view = self._read()
            self._view = (time.monotonic(), view)
            return view

    def _read(self) -> ClusterView:
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()  # the cluster's resource state and the autoscaler's, in one call
        reply.ParseFromString(self.client.get_cluster_status(timeout_s=RPC_TIMEOUT_S))
        state = reply.cluster_resource_state
        view = ClusterView([], [])
        for n in state.node_states:
            status = STATUS.get(n.status, "UNSPECIFIED")
            if status == "DEAD":
                continue
            node_id = n.node_id.hex()
            total, free = dict(n.total_resources), dict(n.available_resources)
            kind = n.ray_node_type_name or None
            view.nodes.append(Node(node_id, float(total.get("CPU", 0)), float(total.get("GPU", 0)),
                                   float(total.get("memory", 0)), type=kind))
            view.free.append(Node(node_id, float(free.get("CPU", 0)), float(free.get("GPU", 0)), type=kind))
            view.idle_s[node_id] = n.idle_duration_ms / 1000
            if status == "DRAINING":
                view.draining.add(node_id)
        for c in state.cluster_resource_constraints:
            for r in c.resource_requests:
                view.request.append({"resources": dict(r.request.resources_bundle), "count": int(r.count)})
        # the launches pending, by type (autoscaler v2's report; v1 makes none)
        auto = reply.autoscaling_state
        for r in auto.pending_instance_requests:
            if r.ray_node_type_name:
                view.pending[r.ray_node_type_name] = view.pending.get(r.ray_node_type_name, 0) + int(r.count)
        for i in auto.pending_instances:
            if i.ray_node_type_name:
                view.pending[i.ray_node_type_name] = view.pending.get(i.ray_node_type_name, 0) + 1
        alive = {}
        for n in view.nodes:
            if n.type:
                alive[n.type] = alive.get(n.type, 0) + 1
        types = self._types()
        view.types = [NodeType(t.name, t.cpus, t.gpus, t.max_count,
                               alive.get(t.name, 0) + view.pending.get(t.name, 0), view.pending.get(t.name, 0))
                      for t in types]
        return view

    def ensure(self, ours: list[dict[str, float]], current: list[dict]) -> bool:
        """Make the cluster's resource request hold `ours` (the runner's bundles; [] to withdraw them) beside what
        others asked for. `current`: the request as the GCS has it ([{resources, count}]). Ray keeps one request
        per cluster, and Ray Train's and Ray Data's autoscaling coordinator rewrites it too: what is there and is
        not the runner's last write is someone else's, kept. Returns whether it wrote."""
        now = _bundles(current)
        others = self.others if self.written is not None and _same(now, self.written) else now
        if not ours and not self.requested:
            self.others = others
            return False
        full = others + list(ours)
        if _same(now, full) and ours == (self.requested or []):
            return False
        self._write(full, list(ours))
        self.others, self.written, self.requested = others, full, list(ours)
        return True

    def _write(self, bundles: list[dict[str, float]], ours: list[dict[str, float]]) -> None:
        """The request: for autoscaler v2 the GCS's cluster resource constraint (`bundles`: the runner's and the
        others' it saw there), for v1 the key-value store (`ours` alone: what others keep there cannot be read
        apart from it, and a copy of theirs would outlive their own withdrawal)."""
        shapes: dict[tuple, int] = {}
        for b in bundles:
            key = tuple(sorted((k, float(v)) for k, v in b.items() if v))
            if key:
                shapes[key] = shapes.get(key, 0) + 1
        self.client.request_cluster_resource_constraint([dict(k) for k in shapes], [{} for _ in shapes],
                                                        list(shapes.values()), timeout_s=RPC_TIMEOUT_S)
        self.client.internal_kv_put(V1_REQUEST_KEY, json.dumps([{k: float(v) for k, v in b.items() if v}
                                                                for b in ours]).encode(), True, None,
                                    timeout=RPC_TIMEOUT_S)
        self._view = None


def _bundles(request: list[dict]) -> list[dict[str, float]]:
    """[{resources, count}] as one bundle a count."""
    return [dict(r["resources"]) for r in request for _ in range(int(r["count"]))]


def _same(a: list[dict], b: list[dict]) -> bool:
    """The same bundles, in any order."""
    key = lambda x: sorted((k, round(float(v), 6)) for k, v in x.items() if v)  # noqa: E731
    return sorted(map(key, a)) == sorted(map(key, b))
