"""The Dockerfile's images, built and run with podman: a Redis (on the host), an
API container and a stub-worker container; a job through the API container's port;
the worker container restarted with jobs queued, and every job finishing.  And the
worker image (torch, Diffusers): a worker container running a tiny SDXL pipeline
mounted at /models, for a job through an API container.

No container registry is reachable in CI, so the base image is made from Debian
packages (mmdebstrap -> podman import) and passed as BASE; pip inside the build reads
the host's pip configuration, mounted for the build only.  The worker image is built
with the ``diffusers`` extra and the torch pip picks (PyPI's CUDA build: ~3 GB of
NVIDIA libraries, which run on the CPU too), or ``EASEL_TEST_TORCH``'s pip arguments,
e.g. ``"torch==2.14.1+cpu torchvision==0.29.1+cpu --extra-index-url
https://download.pytorch.org/whl/cpu"`` where PyTorch's CPU index is reachable (a CPU
torch needs a CPU torchvision: PyPI's, built for CUDA, fails to import beside it, and
spandrel imports it).  Where pip finds no torch the worker test skips, saying so.  Where podman or mmdebstrap
is missing, or the machine cannot run a container, the tests skip with the reason.

Facts of such hosts this handles: rootful podman inside a container needs
``default_ulimits = []`` (raising RLIMIT_NOFILE is not permitted) and ``runc`` where
cgroups are hybrid (crun refuses them); HEALTHCHECK needs ``--format docker``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from .redis_fixtures import RedisServer
from .servers import ROOT, free_port

BASE_TAG = "localhost/easel-test-base:bookworm"
API_TAG = "localhost/easel-test-api:latest"
WORKER_TAG = "localhost/easel-test-worker:latest"
TORCH_SPEC = os.environ.get("EASEL_TEST_TORCH", "")  # pip arguments that pick torch's build ("": pip's choice)
pytestmark = pytest.mark.timeout(900)


@dataclass
class Podman:
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r


def containers_conf(tmp: Path) -> Path:
    conf = "[containers]\ndefault_ulimits = []\n"
    if shutil.which("runc") and not Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroups v1 / hybrid
        conf += '[engine]\nruntime = "runc"\n'
    path = tmp / "containers.conf"
    path.write_text(conf)
    return path


def host_pip_config(tmp: Path) -> list[str]:
    """``-v`` options that give the build the host's pip configuration (as ``pip config
    list`` shows it, environment included) and the local paths it names, read-only."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    options: dict[str, str] = {}
    paths: set[Path] = set()
    for line in out.splitlines():
        key, _, value = line.partition("=")
        option, value = key.rsplit(".", 1)[-1], value.strip().strip("'\"")
        options.setdefault(option, value)  # the environment (listed first) wins, as in pip
        for token in value.split():
            path = Path(token.removeprefix("file://")) if token.startswith(("/", "file:///")) else None
            if path is not None and token.startswith("file://") and path.name == "simple":
                path = path.parent  # an index's pages link to files beside it
            if path is not None and path.exists():
                paths.add(path)
    conf = tmp / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()))
    return ["-v", f"{conf}:/etc/pip.conf:ro", *(a for p in sorted(paths) for a in ("-v", f"{p}:{p}:ro"))]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {tool}): the container images cannot be built here")
    tmp = tmp_path_factory.mktemp("podman")
    run = Podman({**os.environ, "CONTAINERS_CONF": str(containers_conf(tmp))})
    if run("image", "exists", BASE_TAG, check=False).returncode != 0:
        rootfs = tmp / "rootfs.tar"
        made = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,passwd",
                               "bookworm", str(rootfs)], capture_output=True, text=True, timeout=600)  # fmt: skip
        if made.returncode != 0:
            pytest.skip(f"mmdebstrap could not make a Debian base image here: {made.stderr.strip()[-300:]}")
        run("import", str(rootfs), BASE_TAG)
    probe = run("run", "--rm", "--network", "host", BASE_TAG, "python3", "-c", "print('ok')", check=False, timeout=120)
    if probe.returncode != 0 or "ok" not in probe.stdout:
        pytest.skip(f"this machine cannot run containers with podman: {probe.stderr.strip()[-300:]}")
    return run


@pytest.fixture(scope="module")
def api_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("build")
    podman("build", "--format", "docker", "--network", "host", "--target", "api", "--build-arg", f"BASE={BASE_TAG}",
           *host_pip_config(tmp), "-t", API_TAG, str(ROOT), timeout=600)  # fmt: skip
    return API_TAG


@dataclass
class Cluster:
    podman: Podman
    url: str
    worker: str
    names: list[str]


@pytest.fixture(scope="module")
def cluster(podman: Podman, api_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(tmp / "redis")
    redis.start()
    settings = tmp / "local.json"
    settings.write_text(json.dumps({"models": {"stub": {"backend": "stub", "enabled": True, "default_width": 64, "default_height": 64,
                                                        "simulate_step_seconds": 12.0}},
                                    "default_model": "stub", "broker": {"prefix": f"ctr{free_port()}:"}}))  # fmt: skip
    settings.chmod(0o644)
    tag = f"easel-test-{free_port()}"
    api_port = free_port()
    names: list[str] = []

    def start(name: str, role: str, port: int) -> str:
        podman("run", "-d", "--name", name, "--network", "host", "-v", f"{settings}:/srv/easel/local.json:ro",
               "-e", f"EASEL_ROLE={role}", "-e", f"EASEL_PORT={port}", "-e", f"EASEL_BROKER={redis.url}", api_image)  # fmt: skip
        names.append(name)
        return name

    try:
        start(f"{tag}-api", "api", api_port)
        worker = start(f"{tag}-worker", "worker", free_port())
        url = f"http://127.0.0.1:{api_port}"
        wait_healthy(podman, f"{tag}-api", url)
        yield Cluster(podman, url, worker, names)
    finally:
        for name in names:
            podman("rm", "-f", "-t", "5", name, check=False)
        redis.stop()


def wait_healthy(podman: Podman, name: str, url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if podman("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
            break
        time.sleep(0.2)  # start-up poll: no event to await across a container boundary
    raise AssertionError(f"{name} did not start:\n{podman('logs', name, check=False).stdout[-3000:]}")


def finished(c: httpx.Client, task_id: str) -> dict[str, Any]:
    st: dict[str, Any] = {"status": "waiting"}
    for _ in range(10):  # each a long-poll until the status changes
        if st["status"] in ("done", "error", "cancelled"):
            break
        st = c.get("/api/status", params={"task_id": task_id, "wait": 30, "since": st["status"]}).json()
    return st


def test_the_image_has_no_torch_runs_as_a_user_and_keeps_no_pip_config(podman: Podman, api_image: str) -> None:
    r = podman("run", "--rm", api_image, "sh", "-c", "id -u; python3 -c 'import torch' 2>&1 | tail -1; cat /etc/pip.conf 2>/dev/null | wc -c")
    uid, no_torch, pip_conf = r.stdout.split("\n")[:3]
    assert uid != "0" and "No module named 'torch'" in no_torch and pip_conf.strip() == "0"
    (image,) = json.loads(podman("image", "inspect", api_image).stdout)
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])  # kept: built with --format docker


def test_a_job_runs_through_the_api_container_on_the_worker_container(cluster: Cluster) -> None:
    c = httpx.Client(base_url=cluster.url, timeout=60)
    task = c.post("/api/generate", json={"prompt": "a containerised fox", "steps": 2}).json()["task_id"]
    st = finished(c, task)
    assert st["status"] == "done" and st["worker"], st
    assert c.get("/api/image", params={"task_id": task}).content[:4] == b"\x89PNG"
    assert cluster.podman("healthcheck", "run", cluster.names[0], check=False).returncode == 0


def test_jobs_queued_while_the_worker_restarts_all_finish(cluster: Cluster) -> None:
    c = httpx.Client(base_url=cluster.url, timeout=60)
    cluster.podman("stop", "-t", "30", cluster.worker)
    tasks = [c.post("/api/generate", json={"prompt": f"queued {i}", "steps": 4}).json()["task_id"] for i in range(3)]
    assert {c.get("/api/status", params={"task_id": t}).json()["status"] for t in tasks} == {"waiting"}
    cluster.podman("start", cluster.worker)
    assert [finished(c, t)["status"] for t in tasks] == ["done"] * 3


# ------------------------------------------------------------------ the worker image: torch and Diffusers


def torch_found(tmp: Path) -> str | None:
    """None when the host's pip finds the worker image's torch, else why not."""
    spec = TORCH_SPEC.split() or ["torch"]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp), *spec],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    return None if r.returncode == 0 else f"pip finds no torch ({' '.join(spec)}; EASEL_TEST_TORCH): {r.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def worker_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("build_worker")
    if (why := torch_found(tmp / "probe")) is not None:
        pytest.skip(why)
    old = podman("image", "inspect", "-f", "{{.Id}}", WORKER_TAG, check=False).stdout.strip()
    started = time.monotonic()
    podman("build", "--format", "docker", "--network", "host", "--target", "worker", "--build-arg", f"BASE={BASE_TAG}",
           "--build-arg", "EXTRAS=diffusers", "--build-arg", f"TORCH={TORCH_SPEC}", *host_pip_config(tmp),
           "-t", WORKER_TAG, str(ROOT), timeout=1200)  # fmt: skip
    print(f"worker image built in {time.monotonic() - started:.0f} s")  # noqa: T201 (the CI log keeps it)
    if old and old != podman("image", "inspect", "-f", "{{.Id}}", WORKER_TAG).stdout.strip():
        podman("rmi", old, check=False)  # the last run's image (~6 GB with CUDA's torch) is not kept
    return WORKER_TAG


def test_the_worker_image_runs_a_diffusers_model_for_the_api_container(
    podman: Podman, api_image: str, worker_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.tiny_pipelines import build_sdxl

    tmp = tmp_path_factory.mktemp("torch_cluster")
    model = build_sdxl(tmp / "sdxl")
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)  # the image's user reads it
    redis = RedisServer(tmp / "redis")
    redis.start()
    settings = tmp / "local.json"
    settings.write_text(json.dumps({"models": {"sdxl": {"backend": "sdxl", "model_path": "/models/sdxl", "device": "cpu", "enabled": True,
                                                        "default_width": 64, "default_height": 64, "recommended_steps": 2}},
                                    "default_model": "sdxl", "broker": {"prefix": f"ctrw{free_port()}:"}}))  # fmt: skip
    settings.chmod(0o644)
    tag, api_port = f"easel-test-w{free_port()}", free_port()
    names = [f"{tag}-api", f"{tag}-worker"]
    try:
        for name, image, role, port in ((names[0], api_image, "api", api_port), (names[1], worker_image, "worker", free_port())):
            podman("run", "-d", "--name", name, "--network", "host", "-v", f"{settings}:/srv/easel/local.json:ro",
                   "-v", f"{model}:/models/sdxl:ro", "-e", f"EASEL_ROLE={role}", "-e", f"EASEL_PORT={port}",
                   "-e", f"EASEL_BROKER={redis.url}", "-e", "HF_HUB_OFFLINE=1", "-e", "OMP_NUM_THREADS=1", image)  # fmt: skip
        url = f"http://127.0.0.1:{api_port}"
        wait_healthy(podman, names[0], url)
        c = httpx.Client(base_url=url, timeout=60)
        r = c.post("/api/generate", json={"prompt": "a containerised fox", "seed": 3, "sampler": "DPM++ 2M"})
        assert r.status_code == 200, r.text
        st = finished(c, r.json()["task_id"])
        assert st["status"] == "done", (st, podman("logs", names[1], check=False).stdout[-3000:])
        png = c.get("/api/image", params={"task_id": st["task_id"]}).content
        with Image.open(io.BytesIO(png)) as img:  # the infotext: the sampler ran there
            assert img.size == (64, 64) and "Sampler: DPM++ 2M, Schedule type: Karras" in img.info["parameters"]
        versions = podman("run", "--rm", worker_image, "python3", "-c", "import torch, spandrel, diffusers; print(torch.__version__)")
        assert versions.stdout.strip()[:1].isdigit()  # and the upscaler's spandrel imports there too
    finally:
        for name in names:
            podman("rm", "-f", "-t", "5", name, check=False)
        redis.stop()
