"""cluster/: every file parses; the KubeRay manifests satisfy the CRDs' schemas (../shared/kuberay-crds), the
Kubernetes objects the schemas of the kubernetes-validate package, the launcher YAML Ray's own schema, and the worker
image pins a stack the project accepts."""

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_every_file_in_cluster_parses():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"local.sh", "ray-cluster.yaml", "Dockerfile", "README.md", "requirements.txt",
                                      "raycluster.yaml", "rayjob.yaml", "runner-server.yaml", "shared-storage.yaml"}
    for p in files:
        if p.suffix in (".yaml", ".yml"):
            assert docs(p), p
        elif p.suffix == ".sh":
            assert subprocess.run(["bash", "-n", str(p)], capture_output=True).returncode == 0, p
        elif p.name == "Dockerfile":
            dockerfile_instructions(p)
    readme = (CLUSTER / "README.md").read_text()
    for p in files:  # the README says which file is for which situation
        if p.name != "README.md":
            assert p.name in readme, f"cluster/README.md does not mention {p.name}"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of each logical line; fails on an unknown instruction."""
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
             "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    text = re.sub(r"\\\n", " ", "\n".join(x for x in path.read_text().splitlines() if not x.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, args = line.strip().partition(" ")
            assert word.upper() in known, f"{path.name}: unknown instruction {word!r}"
            out.append((word.upper(), args.strip()))
    return out


def test_worker_image_is_pinned_and_pins_what_the_project_accepts():
    from packaging.requirements import Requirement
    from packaging.version import Version

    ins = dockerfile_instructions(CLUSTER / "Dockerfile")
    assert ins[0][0] == "FROM" and re.fullmatch(r"[\w./-]+:\d[\w.-]*", ins[0][1]), ins[0]  # a versioned base
    for word, args in ins:
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository lacks"
    pins = {}
    for line in (CLUSTER / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{line}: not pinned"
            pins[req.name.lower().replace("_", "-")] = Version(spec[0].version)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, project):
        name = dep.name.lower().replace("_", "-")
        assert name in pins, f"the image does not pin {name}"
        assert dep.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {dep.specifier}"
    torch = re.search(r"torch==([\d.]+)", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert Version(torch) == pins["torch"]


def test_launcher_yaml_satisfies_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] > 0 and config["head_node_type"] == "head"
    assert any("/mnt/shared" in c for c in config["initialization_commands"])
    config["available_node_types"]["head"]["node_confg"] = {}  # a typo is caught
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(config))


# --- KubeRay -------------------------------------------------------------------------------------------------------


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent: the KubeRay CRDs are not here to validate against")
    for path in CRDS.glob("*.yaml"):
        crd = docs(path)[0]
        if crd["spec"]["names"]["kind"] == kind:
            return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind}")


def problems(value, schema: dict, where: str = "") -> list[str]:
    """JSON Schema errors, and every key the schema does not know (Kubernetes would drop it without a word)."""
    import jsonschema

    out = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
           for e in jsonschema.Draft7Validator(schema).iter_errors(value)]
    return out + unknown_keys(value, schema, where)


def unknown_keys(value, schema: dict, where: str) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            if k in schema["properties"]:
                out += unknown_keys(v, schema["properties"][k], f"{where}.{k}")
            elif not schema.get("additionalProperties"):
                out.append(f"{where}.{k}: unknown field")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in value.items():
            out += unknown_keys(v, schema["additionalProperties"], f"{where}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += unknown_keys(v, schema["items"], f"{where}[{i}]")
    return out


KUBERAY = [(p.name, i) for p in MANIFESTS for i, d in enumerate(docs(p)) if d["apiVersion"].startswith("ray.io/")]
CORE = [(p.name, i) for p in MANIFESTS for i, d in enumerate(docs(p)) if not d["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize("name,i", KUBERAY)
def test_kuberay_manifests_satisfy_the_crds(name, i):
    doc = docs(CLUSTER / "kuberay" / name)[i]
    assert problems(doc, crd_schema(doc["kind"])) == []


def test_the_crd_check_catches_a_misspelt_and_a_mistyped_field():
    doc = docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    schema = crd_schema("RayCluster")
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = 7
    found = problems(bad, schema)
    assert any("maxReplica: unknown field" in p for p in found) and any("7 is not of type 'string'" in p
                                                                          for p in found)


@pytest.mark.parametrize("name,i", CORE)
def test_kubernetes_objects_satisfy_kubernetes_schemas(name, i):
    import kubernetes_validate

    doc = docs(CLUSTER / "kuberay" / name)[i]
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_check_catches_a_bad_deployment():
    import kubernetes_validate

    dep = next(d for d in docs(CLUSTER / "kuberay" / "runner-server.yaml") if d["kind"] == "Deployment")
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


def test_manifests_fit_together():
    """Names one manifest gives are the names the others use; job folders and the store are apart."""
    by_kind = {(d["kind"], d["metadata"].get("name")): d for p in MANIFESTS for d in docs(p)}
    assert ("PersistentVolumeClaim", "runner-shared") in by_kind
    shared = by_kind[("PersistentVolumeClaim", "runner-shared")]
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    ray = by_kind[("RayCluster", "runner-ray")]
    groups = [ray["spec"]["headGroupSpec"]] + ray["spec"]["workerGroupSpecs"]
    for g in groups:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in g["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"runner-shared"}
    gpu = ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    server = by_kind[("Deployment", "runner")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    assert env["RUNNER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "runner-token"  # never a literal token
    assert env["RUNNER_ARTIFACTS"]["value"].startswith("/mnt/shared/")
    assert f"http://{ray['metadata']['name']}-head-svc:8265" in server["command"]
    job = by_kind[("RayJob", None)]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == ray["metadata"]["name"]


def test_the_clusters_autoscale_from_zero_and_the_server_reads_what_it_needs_to_ask_for_nodes():
    """Both ways to a cluster: GPU workers from 0 to a max, an idle timeout, and the runner server started with the
    GCS's address and the cluster config it reads node types from (runner.elastic), pointing at the right places."""
    ray_cluster = docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    spec = ray_cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"] and group["idleTimeoutSeconds"] > 0, group
    server = next(d for d in docs(CLUSTER / "kuberay" / "runner-server.yaml") if d["kind"] == "Deployment")
    pod = server["spec"]["template"]["spec"]
    c = pod["containers"][0]
    gcs = c["command"][c["command"].index("--ray-gcs") + 1]
    head = f"{ray_cluster['metadata']['name']}-head-svc"  # KubeRay's name for the head's Service
    assert gcs == f"{head}:6379" and c["command"][c["command"].index("--ray") + 1] == f"http://{head}:8265"
    config = next(e["value"] for e in c["env"] if e["name"] == "RUNNER_CLUSTER_CONFIG")
    mount = next(m for m in c["volumeMounts"] if config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    readme = (CLUSTER / "README.md").read_text()
    key = config.rsplit("/", 1)[1]
    assert (f"kubectl create configmap {volume['configMap']['name']} --from-file={key}=cluster/kuberay/"
            "raycluster.yaml") in readme

    launcher = docs(CLUSTER / "ray-cluster.yaml")[0]
    workers = [t for n, t in launcher["available_node_types"].items() if n != launcher["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] for t in workers)
    assert launcher["idle_timeout_minutes"] > 0
    start = " ".join(launcher["head_start_ray_commands"])
    assert "--port=6379" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "--ray-gcs 127.0.0.1:6379" in start and "RUNNER_CLUSTER_CONFIG=~/ray_bootstrap_config.yaml" in start
