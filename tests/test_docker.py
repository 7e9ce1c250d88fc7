"""Docker files, compose stack and deployments: the images install the project from pyproject.toml,
the compose file parses, and the deployments point at real flows."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project_from_pyproject(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^COPY pyproject\.toml", text, re.M)
    installs = re.findall(r"pip install ([^\n\\]*)", text)
    project_installs = [line for line in installs if re.search(r"(^|\s)\.(\[[\w,]+\])?\s*$", line)]
    assert project_installs, "the image must `pip install .` (dependencies from pyproject.toml)"
    for line in installs:
        packages = [w for w in line.split() if not w.startswith("-") and w != "." and not w.startswith("http")]
        assert set(packages) <= {"pip", "setuptools", "wheel"}, f"second dependency list in {dockerfile.name}: {line}"
    assert "requirements" not in text
    assert re.search(r"^USER (?!root)\w+", text, re.M), "images must not run as root"
    assert 'ENTRYPOINT ["fat-distill"]' in text
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\s*=", text, re.I), "no secrets in images"


def test_gpu_image_uses_a_cuda_runtime_base():
    assert re.search(r"^FROM nvidia/cuda:[\w.\-]+runtime", DOCKERFILES[0].read_text(), re.M)


def test_compose_file_parses_and_reserves_a_gpu():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker"} <= set(services)
    assert all("healthcheck" in s for s in services.values())
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    text = (ROOT / "docker" / "compose.yaml").read_text()
    assert "change-me" not in text, "passwords come from the env file, not the compose file"
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package) not installed; .ci/run installs it")
    done = subprocess.run([exe, "-f", str(ROOT / "docker" / "compose.yaml"), "--env-file",
                           str(ROOT / "docker" / "env.example"), "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_deployments_point_at_existing_flows():
    import importlib

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"pipeline", "sweep"} <= names
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, func), "fn"), f"{deployment['entrypoint']} is not a Prefect flow"
        assert deployment["work_pool"]["name"].startswith("fat-distill-")


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_compose_server_runs_the_prefect_the_project_installs():
    import prefect

    text = (ROOT / "docker" / "compose.yaml").read_text()
    images = re.findall(r"image:\s*prefecthq/prefect:(\d+\.\d+(?:\.\d+)?)", text)
    assert images, "the compose server image must name a Prefect version (prefecthq/prefect:X.Y[.Z]-pythonN)"
    for tag in images:
        assert _minor(tag) == _minor(prefect.__version__), (
            f"docker/compose.yaml runs Prefect {tag} but the project installs {prefect.__version__}: pin the "
            "server image to the installed major.minor (and pyproject.toml's prefect range with it)")
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert _minor(str(spec["prefect-version"])) == _minor(prefect.__version__)


def test_process_deployments_run_in_the_deployed_project_and_docker_ones_in_app():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        pull = deployment.get("pull", spec.get("pull"))
        (step,) = pull
        (name, args), = step.items()
        if "docker" in deployment["work_pool"]["name"]:
            assert args["directory"] == "/app", deployment["name"]
        else:
            assert name == "flows.steps.enter_project_directory", deployment["name"]
            assert args["directory"] == "{{ $PWD }}"  # filled in by `prefect deploy`
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert compose["services"]["worker"]["environment"]["FAT_DISTILL_PROJECT_DIR"] == "/app"
    # device limits are named by host: the worker's host comes from the env file, which documents it
    assert "FAT_DISTILL_HOST" in compose["services"]["worker"]["environment"]
    assert "FAT_DISTILL_HOST=" in (ROOT / "docker" / "env.example").read_text()


def test_the_pull_step_enters_the_project_folder_or_the_one_the_worker_names(tmp_path, monkeypatch):
    import os

    from flows.steps import PROJECT_DIR_ENV, enter_project_directory

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PROJECT_DIR_ENV, raising=False)
    assert enter_project_directory(str(ROOT)) == {"directory": str(ROOT)}
    assert Path(os.getcwd()) == ROOT

    elsewhere = tmp_path / "checkout"
    (elsewhere / "flows").mkdir(parents=True)
    (elsewhere / "flows" / "pipeline.py").write_text("")
    monkeypatch.setenv(PROJECT_DIR_ENV, str(elsewhere))
    assert enter_project_directory("/app") == {"directory": str(elsewhere.resolve())}
    assert Path(os.getcwd()).resolve() == elsewhere.resolve()

    monkeypatch.delenv(PROJECT_DIR_ENV)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'} \(the folder `prefect deploy` ran in\) "
                                                 rf"has no flows/pipeline.py.*{PROJECT_DIR_ENV}"):
        enter_project_directory(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="run `prefect deploy` from a shell in the project folder"):
        enter_project_directory("{{ $PWD }}")
    with pytest.raises(FileNotFoundError, match="names no project folder"):
        enter_project_directory()
