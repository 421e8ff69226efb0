"""cluster/: every manifest parses, and its images, commands, paths, services and secrets agree with the project."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gan.config import Config
from gan.config_loader import load_config
from pipelines.cli import _parser
from pipelines.ray_train import check_resources

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"
BUCKET_SCHEMES = ("s3", "gs")
DOWNLOADED = ("mnist", "fashion-mnist", "cifar10")  # data sources torchvision fetches into data.root
PINS = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
EXPECTED = {"ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared-storage.yaml",
            "mlflow/docker-compose.yaml", "mlflow/mlflow-server.yaml", "mlflow/secret.example.yaml",
            "ray-cluster-bucket.yaml", "kuberay/raycluster-bucket.yaml", "kuberay/rayjob-bucket.yaml",
            "kuberay/storage-secret.example.yaml"}
BUCKET_FILES = ["ray-cluster-bucket.yaml", "kuberay/raycluster-bucket.yaml", "kuberay/rayjob-bucket.yaml"]


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def doc(name: str, kind: str | None = None) -> dict:
    found = [d for d in docs(name) if kind is None or d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind or 'document'}, found {len(found)}"
    return found[0]


def ray_image(image: str, gpu: bool) -> bool:
    return image == f"rayproject/ray:{PINS['ray']}-py311" + ("-gpu" if gpu else "")


def cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pipeline_argv(command: str) -> list[str]:
    """The pipeline's own arguments in a shell command that runs it, directly or through `submit ... --`."""
    tokens = shlex.split(command)
    at = next(i for i in range(len(tokens) - 1) if tokens[i:i + 2] == ["-m", "pipelines"])
    argv = tokens[at + 2:]
    if argv[0] != "submit":
        return argv
    _parser().parse_args(argv)  # submit's own options, e.g. --address and --env, exist as written
    return argv[argv.index("--") + 1:]


def run_args(command: str) -> argparse.Namespace:
    return _parser().parse_args(pipeline_argv(command))


def in_bucket(storage: str) -> bool:
    return urlparse(storage).scheme in BUCKET_SCHEMES


def on_shared(path: str) -> bool:
    return path == SHARED or path.startswith(SHARED + "/")


def check_cluster_run(command: str, code_at: str = "") -> Config:
    """Parses a cluster pipeline command with the real CLI, builds its config, and checks where its files go: all on
    the shared volume, or (a bucket --storage) nothing on a volume that is not there.
    `code_at` is where the repository sits on the cluster when the command names configs by absolute path."""
    args = run_args(command)
    assert args.command == "run", command
    config = args.config.removeprefix(code_at + "/") if code_at else args.config
    assert not Path(config).is_absolute(), f"{args.config} is not under the code folder {code_at}"
    assert (REPO / config).is_file(), f"{command}: {args.config} is not in the repository"
    assert Path(config).parent.name == "configs", args.config
    cfg = load_config(REPO / config, args.overrides)
    assert not Path(cfg.data.out_dir).is_absolute(), (
        f"{command}: data.out_dir={cfg.data.out_dir!r} must be a folder under --storage")
    assert args.storage, f"{command}: a cluster run needs --storage (nodes do not share the default)"
    paths = {"--storage": args.storage, "--workdir": args.workdir}
    if not cfg.data.is_points and cfg.data.source != "digits":  # sources read from (or download into) data.root
        paths["data.root"] = cfg.data.root
    if in_bucket(args.storage):
        url = urlparse(args.storage)
        assert url.netloc and url.path.strip("/"), f"{command}: --storage {args.storage} names no bucket and prefix"
        for what, path in paths.items():
            assert not on_shared(path), f"{command}: {what}={path!r} is on {SHARED}, which bucket clusters lack"
        assert cfg.data.source not in ("idx", "folder"), f"{command}: no node has data.root of {cfg.data.source}"
        if cfg.data.source in DOWNLOADED:
            assert cfg.data.download, f"{command}: no node has {cfg.data.source}'s files; set data.download=true"
    else:
        for what, path in paths.items():
            assert on_shared(path), f"{command}: {what}={path!r} is not on the shared storage {SHARED}"
    return cfg


def project_dependencies() -> list[Requirement]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def check_installs_project_dependencies(command: str, where: str) -> dict[str, Requirement]:
    """The `pip install` in `command` installs every dependency of pyproject.toml, pinned where constraints.txt pins
    it, else with pyproject's own specifier. Returns what it installs, by canonical name."""
    tokens = shlex.split(command.split("||")[0])
    at = tokens.index("pip")
    assert tokens[at + 1] == "install", f"{where}: {command}"
    got = {canonicalize_name(r.name): r for r in map(Requirement, (t for t in tokens[at + 2:] if t[0] != "-"))}
    pins = {canonicalize_name(name): pin for name, pin in PINS.items()}
    for want in project_dependencies():
        name = canonicalize_name(want.name)
        assert name in got, f"{where} does not install {want} (pyproject.toml)"
        have = got[name]
        assert have.extras >= want.extras, f"{where}: {have} lacks extras of {want}"
        if name in pins:
            assert want.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {want}"
            assert str(have.specifier) == f"=={pins[name]}", f"{where}: {have}, but constraints.txt pins {pins[name]}"
        else:
            assert have.specifier == want.specifier, f"{where}: {have}, but pyproject.toml says {want}"
    return got


def test_every_cluster_file_is_there_and_parses():
    names = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.y*ml")}
    assert names >= EXPECTED
    for name in names:
        for d in docs(name):
            assert isinstance(d, dict), name
            if "apiVersion" in d:
                assert d["kind"] and d["metadata"]["name"], name


# --- Ray cluster launcher -----------------------------------------------------------------------------------------

LAUNCHER = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
BUCKET_LAUNCHER = yaml.safe_load((CLUSTER / "ray-cluster-bucket.yaml").read_text())
LAUNCHERS = {"shared": LAUNCHER, "bucket": BUCKET_LAUNCHER}


@pytest.mark.parametrize("variant", LAUNCHERS)
def test_launcher_matches_rays_own_schema(variant):
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(LAUNCHERS[variant], json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))


@pytest.mark.parametrize("variant", LAUNCHERS)
def test_launcher_node_types_reference_each_other(variant):
    launcher = LAUNCHERS[variant]
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is the CPU node"
    workers = {name: t for name, t in types.items() if name != head}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type offers a GPU"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= launcher["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= launcher["max_workers"]
    cfg = load_config(REPO / "configs" / "cifar10-dcgan.yaml")
    assert sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu.values()) >= cfg.scale.num_workers
    check_resources(cfg, types[head]["resources"]["CPU"] + sum(t["min_workers"] * t["resources"]["CPU"]
                                                              for t in workers.values()))


@pytest.mark.parametrize("variant", LAUNCHERS)
def test_launcher_images_pin_the_projects_ray(variant):
    docker = LAUNCHERS[variant]["docker"]
    assert ray_image(docker["head_image"], gpu=False)
    assert ray_image(docker["worker_image"], gpu=True)
    assert ray_image(docker["image"], gpu=False) or ray_image(docker["image"], gpu=True)


def test_launcher_installs_the_synced_project_on_every_node():
    repo_at = [remote for remote, local in LAUNCHER["file_mounts"].items() if local == "."]
    assert len(repo_at) == 1, "file_mounts must sync the repository (local path '.') to one folder"
    installs = [c for c in LAUNCHER["setup_commands"] if "pip install" in c]
    assert installs, "no setup command installs the project"
    cd, pip = (shlex.split(part) for part in installs[0].split("&&"))
    assert cd == ["cd", repo_at[0]]
    assert pip[:2] == ["pip", "install"] and "-c" in pip and "-e" in pip
    assert pip[pip.index("-c") + 1] == "constraints.txt" and pip[pip.index("-e") + 1] == "."
    assert not LAUNCHER.get("head_setup_commands") and not LAUNCHER.get("worker_setup_commands")


def start_commands(launcher: dict) -> list[str]:
    """The `ray start` commands of the head and the workers, head first."""
    head = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == len(workers) == 1, "one `ray start` each for the head and the workers"
    return head + workers


@pytest.mark.parametrize("variant", LAUNCHERS)
def test_launcher_turns_token_auth_on_everywhere_and_keeps_the_dashboard_on_loopback(variant):
    launcher = LAUNCHERS[variant]
    token = [remote for remote, local in launcher["file_mounts"].items() if local == "~/.ray/auth_token"]
    assert token == ["/home/ray/.ray/auth_token"], "the token made locally must reach ~/.ray of the ray user"
    for command in start_commands(launcher):
        assert "RAY_AUTH_MODE=token ray start" in " ".join(command.split()), command
    head = start_commands(launcher)[0]
    assert "--dashboard-host=127.0.0.1" in shlex.split(head.split("ray start", 1)[1])


def test_launcher_mounts_shared_storage_at_the_same_path_in_every_container():
    assert f"-v {SHARED}:{SHARED}" in LAUNCHER["docker"]["run_options"]
    assert not LAUNCHER["docker"].get("head_run_options") and not LAUNCHER["docker"].get("worker_run_options")
    assert any(re.search(rf"\bmount\b.*\s{SHARED}\b", " ".join(c.split())) for c in LAUNCHER["initialization_commands"])


def test_bucket_launcher_shares_no_volume_and_no_code():
    docker = BUCKET_LAUNCHER["docker"]
    options = [o for key in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(key, [])]
    assert not [o for o in options if re.match(r"(-v|--volume|--mount)\b", o)], f"docker mounts a volume: {options}"
    assert not BUCKET_LAUNCHER.get("initialization_commands"), "nothing to mount on the hosts"
    assert "." not in BUCKET_LAUNCHER["file_mounts"].values(), "the code travels with each job, not by file_mounts"
    assert SHARED not in (CLUSTER / "ray-cluster-bucket.yaml").read_text()


def test_bucket_launcher_installs_the_projects_dependencies_on_every_node():
    installs = [c for c in BUCKET_LAUNCHER["setup_commands"] if "pip install" in c]
    assert len(installs) == 1, "one setup command installs the dependencies"
    check_installs_project_dependencies(installs[0], "ray-cluster-bucket.yaml setup_commands")
    assert not BUCKET_LAUNCHER.get("head_setup_commands") and not BUCKET_LAUNCHER.get("worker_setup_commands")


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_bucket_launcher_exports_the_storage_credentials_into_ray_start(tmp_path):
    mounts = {local: remote for remote, local in BUCKET_LAUNCHER["file_mounts"].items()}
    local = "cluster/storage.env"
    assert local in mounts, "file_mounts must copy cluster/storage.env onto every node"
    assert (REPO / f"{local}.example").is_file() and "storage.env" in (CLUSTER / ".gitignore").read_text().split()
    example = env_file(REPO / f"{local}.example")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(example)
    assert example["AWS_ACCESS_KEY_ID"] == example["AWS_SECRET_ACCESS_KEY"] == "CHANGE_ME"
    # Run each start command in bash with the example as the node's file and a `ray` that prints its environment.
    (tmp_path / "ray").write_text("#!/bin/sh\nenv\n")
    (tmp_path / "ray").chmod(0o755)
    for command in start_commands(BUCKET_LAUNCHER):
        assert mounts[local] in command, f"{command} does not read {mounts[local]}"
        script = command.replace(mounts[local], str(REPO / f"{local}.example"))
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "RAY_HEAD_IP": "10.0.0.1"}
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        seen = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        assert {k: seen.get(k) for k in example} == example, f"`ray start` does not get the credentials: {command}"
        assert seen.get("RAY_AUTH_MODE") == "token"


# --- KubeRay --------------------------------------------------------------------------------------------------------

RAYCLUSTER = doc("kuberay/raycluster.yaml", "RayCluster")
RAYJOB = doc("kuberay/rayjob.yaml", "RayJob")
SPECS = {"RayCluster": RAYCLUSTER["spec"], "RayJob": RAYJOB["spec"]["rayClusterSpec"]}
PVC = doc("kuberay/shared-storage.yaml", "PersistentVolumeClaim")
BUCKET_RAYCLUSTER = doc("kuberay/raycluster-bucket.yaml", "RayCluster")
BUCKET_RAYJOB = doc("kuberay/rayjob-bucket.yaml", "RayJob")
BUCKET_SPECS = {"bucket RayCluster": BUCKET_RAYCLUSTER["spec"],
                "bucket RayJob": BUCKET_RAYJOB["spec"]["rayClusterSpec"]}
ALL_SPECS = {**SPECS, **BUCKET_SPECS}
STORAGE_SECRET = doc("kuberay/storage-secret.example.yaml", "Secret")


def pods(spec: dict) -> list[tuple[str, dict, int]]:
    """(group, pod spec, pod count) of the head and each worker group."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"], 1)]
    return out + [(g["groupName"], g["template"]["spec"], g["replicas"]) for g in spec["workerGroupSpecs"]]


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_kuberay_kinds_versions_images_and_auth():
    for d in (RAYCLUSTER, RAYJOB, BUCKET_RAYCLUSTER, BUCKET_RAYJOB):
        assert d["apiVersion"] == "ray.io/v1", d["metadata"]["name"]
    for kind, spec in ALL_SPECS.items():
        assert spec["rayVersion"] == PINS["ray"], kind
        assert spec["authOptions"]["mode"] == "token", kind
        for group, pod, _ in pods(spec):
            ray = pod["containers"][0]
            assert ray_image(ray["image"], gpu=gpus(ray) > 0), f"{kind} {group}: {ray['image']}"
        workers = spec["workerGroupSpecs"]
        assert any(gpus(g["template"]["spec"]["containers"][0]) >= 1 for g in workers), f"{kind}: no GPU group"
        for g in workers:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def test_kuberay_pods_mount_the_shared_claim_at_the_same_path():
    assert PVC["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes write the shared volume"
    shell = doc("kuberay/shared-storage.yaml", "Pod")["spec"]
    for kind, spec in [*SPECS.items(), ("shell", None)]:
        for group, pod, _ in pods(spec) if spec else [("shell", shell, 1)]:
            claims = {v["name"] for v in pod["volumes"]
                      if v.get("persistentVolumeClaim", {}).get("claimName") == PVC["metadata"]["name"]}
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert [mounts.get(name) for name in claims] == [SHARED], f"{kind} {group}: {claims}, {mounts}"


def install_command(container: dict) -> str:
    return " ".join(container["command"] + container.get("args", []))


def assert_valid_in_kuberay_shell(command: str, where: str) -> None:
    """KubeRay runs `<command> && ulimit -n 65536; ray start ...` in bash: the command must stay valid there."""
    check = subprocess.run(["bash", "-n", "-c", f"{command} && ulimit -n 65536; ray start --head"],
                           capture_output=True, text=True)
    assert check.returncode == 0, f"{where}: {check.stderr}"


def test_kuberay_pods_install_the_code_from_the_shared_volume():
    for kind, spec in SPECS.items():
        for group, pod, _ in pods(spec):
            command = install_command(pod["containers"][0])
            assert_valid_in_kuberay_shell(command, f"{kind} {group}")
            pip = shlex.split(command.split("flock", 1)[1].split("||")[0])
            assert pip[pip.index("pip") + 1] == "install", command
            code = pip[pip.index("-e") + 1]
            assert code.startswith(SHARED + "/") and pip[pip.index("-c") + 1] == f"{code}/constraints.txt"


def test_kuberay_mlflow_uri_names_the_mlflow_service_and_an_allowed_host():
    services = {d["metadata"]["name"]: d for d in docs("mlflow/mlflow-server.yaml") if d["kind"] == "Service"}
    allowed = mlflow_args(k8s_container("mlflow")["args"][0]).params["allowed_hosts"].split(",")
    for kind, spec in ALL_SPECS.items():
        for group, pod, _ in pods(spec):
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            host = env["MLFLOW_TRACKING_URI"].removeprefix("http://")
            name, port = host.split(":")
            assert int(port) in [p["port"] for p in services[name]["spec"]["ports"]], f"{kind} {group}: {host}"
            assert any(fnmatch.fnmatch(host, a) for a in allowed), f"MLflow's --allowed-hosts refuse {host}"


def check_rayjob_entrypoint(rayjob: dict) -> str:
    entrypoint = rayjob["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint into the submitter's shell line, where these would split it.
    assert not re.search(r"&&|\|\||;|\|", entrypoint), entrypoint
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    return entrypoint


def check_rayjob_fits(spec: dict, cfg: Config) -> None:
    """The cluster the RayJob creates has the GPUs and CPUs its run asks for."""
    assert cfg.scale.use_gpu
    groups = pods(spec)
    assert sum(n * gpus(pod["containers"][0]) for _, pod, n in groups) >= cfg.scale.num_workers
    for group, pod, _ in groups:  # a Train worker takes 1 GPU and cpus_per_worker CPUs of one pod
        ray = pod["containers"][0]
        assert cpus(ray["resources"]["limits"]["cpu"]) >= gpus(ray) * cfg.scale.cpus_per_worker, group
    check_resources(cfg, sum(n * cpus(pod["containers"][0]["resources"]["limits"]["cpu"]) for _, pod, n in groups))


def test_rayjob_entrypoint_runs_the_pipeline_on_the_cluster_it_creates():
    entrypoint = check_rayjob_entrypoint(RAYJOB)
    code = shlex.split(install_command(SPECS["RayJob"]["headGroupSpec"]["template"]["spec"]["containers"][0])
                       .split("flock", 1)[1].split("||")[0])
    cfg = check_cluster_run(entrypoint, code_at=code[code.index("-e") + 1])
    assert on_shared(run_args(entrypoint).storage)
    check_rayjob_fits(SPECS["RayJob"], cfg)


def test_readme_pipeline_commands_parse_build_and_use_shared_or_bucket_storage():
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [line.split("#")[0] for b in blocks for line in b.splitlines() if "-m pipelines" in line]
    assert len(commands) >= 5
    for command in commands:
        check_cluster_run(command)
    kinds = {in_bucket(run_args(command).storage) for command in commands}
    assert kinds == {False, True}, "the README shows runs on the shared volume and in a bucket"


# --- KubeRay without a shared volume ----------------------------------------------------------------------------------

def test_bucket_kuberay_files_have_no_persistent_volume():
    for name in BUCKET_FILES[1:]:
        assert not [d for d in docs(name) if d["kind"] == "PersistentVolumeClaim"], name
        assert SHARED not in (CLUSTER / name).read_text(), f"{name} names {SHARED}"
    for kind, spec in BUCKET_SPECS.items():
        for group, pod, _ in pods(spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            # Only pod-local scratch (the /dev/shm emptyDir): nothing that outlives the pod or is shared.
            for name, v in volumes.items():
                assert set(v) == {"name", "emptyDir"}, f"{kind} {group}: volume {name} is not an emptyDir: {v}"
            for c in pod["containers"]:
                mounts = c.get("volumeMounts", [])
                assert {m["name"] for m in mounts} <= set(volumes), f"{kind} {group}: {mounts}"


def secret_env(container: dict) -> dict[str, dict]:
    """The container's variables read from Secrets: name -> secretKeyRef."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}


def test_bucket_kuberay_ray_containers_get_every_storage_key_from_the_secret():
    secret, keys = STORAGE_SECRET["metadata"]["name"], set(STORAGE_SECRET["stringData"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    for kind, spec in BUCKET_SPECS.items():
        for group, pod, _ in pods(spec):
            for c in pod["containers"]:
                refs = secret_env(c)
                assert {name: (r["name"], r["key"]) for name, r in refs.items()} == {k: (secret, k) for k in keys}, \
                    f"{kind} {group} {c['name']}: {refs}, but Secret {secret} holds {sorted(keys)}"
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert not refs[name].get("optional"), f"{kind} {group}: {name} must not be optional"


def test_storage_secret_example_has_placeholders_matches_storage_env_and_is_ignored():
    data = STORAGE_SECRET["stringData"]
    assert data["AWS_ACCESS_KEY_ID"] == data["AWS_SECRET_ACCESS_KEY"] == "CHANGE_ME"
    assert set(data) == set(env_file(CLUSTER / "storage.env.example")), "the launcher and KubeRay set other keys"
    assert "storage-secret.yaml" in (CLUSTER / "kuberay" / ".gitignore").read_text().split()
    # The example's endpoint is the MinIO Service of cluster/mlflow/.
    services = {d["metadata"]["name"]: d["spec"] for d in docs("mlflow/mlflow-server.yaml") if d["kind"] == "Service"}
    endpoint = urlparse(data["AWS_ENDPOINT_URL"])
    assert endpoint.port in [p["port"] for p in services[endpoint.hostname]["ports"]], data["AWS_ENDPOINT_URL"]


def test_bucket_kuberay_pods_install_the_projects_dependencies():
    for kind, spec in BUCKET_SPECS.items():
        for group, pod, _ in pods(spec):
            command = install_command(pod["containers"][0])
            assert_valid_in_kuberay_shell(command, f"{kind} {group}")
            assert command.rstrip().endswith("|| exit 1"), f"{kind} {group}: a failed install must stop the pod"
            got = check_installs_project_dependencies(command, f"{kind} {group}")
            # Ray fetches an s3:// working_dir with boto3 and smart_open, which must be there before `ray start`.
            assert {"boto3", "smart-open"} <= set(got), f"{kind} {group}: {sorted(got)}"


def test_bucket_rayjob_runs_the_pipeline_with_a_bucket_storage_root_and_code_from_the_bucket():
    entrypoint = check_rayjob_entrypoint(BUCKET_RAYJOB)
    cfg = check_cluster_run(entrypoint)
    storage = urlparse(run_args(entrypoint).storage)
    assert storage.scheme == "s3", f"{entrypoint}: --storage is not an s3:// URI"
    working_dir = urlparse(yaml.safe_load(BUCKET_RAYJOB["spec"]["runtimeEnvYAML"])["working_dir"])
    assert working_dir.scheme == "s3" and working_dir.path.endswith(".zip"), working_dir.geturl()
    assert working_dir.netloc == storage.netloc, "the code and the storage root share a bucket and its credentials"
    check_rayjob_fits(BUCKET_SPECS["bucket RayJob"], cfg)


# --- MLflow server ----------------------------------------------------------------------------------------------------

def k8s_container(name: str) -> dict:
    deployment = next(d for d in docs("mlflow/mlflow-server.yaml") if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == name)
    return deployment["spec"]["template"]["spec"]["containers"][0]


def mlflow_args(command: str):
    """Parses the `mlflow server` part of a shell command with the installed MLflow's own CLI."""
    from mlflow.cli import server

    part = next(p for p in command.split("&&") if "mlflow server" in p)
    tokens = shlex.split(part)
    return server.make_context("server", tokens[tokens.index("server") + 1:])


COMPOSE = doc("mlflow/docker-compose.yaml")
SERVERS = {"compose": (COMPOSE["services"]["mlflow"]["image"], COMPOSE["services"]["mlflow"]["command"][0]),
           "kubernetes": (k8s_container("mlflow")["image"], k8s_container("mlflow")["args"][0])}


@pytest.mark.parametrize("where", SERVERS)
def test_mlflow_server_uses_postgres_and_s3_in_mlflow_3(where):
    image, command = SERVERS[where]
    tag = image.split(":v")[1]
    assert image.startswith("ghcr.io/mlflow/mlflow:v") and tag.split(".")[0] == version("mlflow").split(".")[0] == "3"
    install = shlex.split(command.split("&&")[0])
    assert install[:2] == ["pip", "install"] and {"psycopg2-binary", "boto3"} <= set(install)
    params = mlflow_args(command).params
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]
    assert params["host"] == "0.0.0.0" and params["port"] == 5000


def test_kubernetes_mlflow_wiring_services_env_and_secret_placeholders():
    secret = doc("mlflow/secret.example.yaml", "Secret")
    objects = docs("mlflow/mlflow-server.yaml")
    deployments = [d for d in objects if d["kind"] == "Deployment"]
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for var in re.findall(r"\$\{?([A-Za-z_]\w*)", " ".join(c.get("args", []))):
                assert var in env, f"{c['name']} uses ${var}, which its env does not set"
            for e in env.values():
                if "valueFrom" in e:
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert all(v == "CHANGE_ME" for k, v in secret["stringData"].items() if "PASSWORD" in k)
    ports = {(d["spec"]["template"]["metadata"]["labels"]["app"], p["containerPort"]) for d in deployments
             for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {d["metadata"]["name"]: d["spec"] for d in objects if d["kind"] == "Service"}
    for name, spec in services.items():
        assert all((spec["selector"]["app"], p["targetPort"]) in ports for p in spec["ports"]), name
    mlflow = k8s_container("mlflow")
    backend = mlflow_args(mlflow["args"][0]).params["backend_store_uri"]
    s3 = next(e["value"] for e in mlflow["env"] if e["name"] == "MLFLOW_S3_ENDPOINT_URL")
    for host, port in [backend.split("@")[1].split("/")[0].split(":"), s3.removeprefix("http://").split(":")]:
        assert int(port) in [p["port"] for p in services[host]["ports"]], f"{host}:{port} is no Service"


def test_compose_wiring_loopback_ports_and_env_placeholders():
    services = COMPOSE["services"]
    example = dict(line.split("=", 1) for line in (CLUSTER / "mlflow" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"\$\{(\w+)", (CLUSTER / "mlflow" / "docker-compose.yaml").read_text()))
    assert used <= set(example), f"compose reads {used - set(example)}, which .env.example does not list"
    assert all(v == "CHANGE_ME" for k, v in example.items() if "PASSWORD" in k)
    assert example["MLFLOW_BIND"] == "127.0.0.1"
    for name, service in services.items():
        for published in service.get("ports", []):
            assert published.startswith(("127.0.0.1:", "${MLFLOW_BIND:-127.0.0.1}:")), f"{name}: {published}"
        env = service.get("environment", {})
        for var in re.findall(r"\$\$\{?(\w+)", " ".join(service.get("command", []))):
            assert var in env, f"{name} uses $${var}, which its environment does not set"
    backend = mlflow_args(services["mlflow"]["command"][0].replace("$$", "$")).params["backend_store_uri"]
    assert backend.split("@")[1].split(":")[0] in services
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].split("//")[1].split(":")[0] in services
    ignored = (CLUSTER / "mlflow" / ".gitignore").read_text().split()
    assert {".env", "secret.yaml"} <= set(ignored)
