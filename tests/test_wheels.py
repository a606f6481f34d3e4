"""Separately installable, and never from the public index: the README's "Installing the packages in another project"
runs here, read from the README itself so the two cannot drift.

Our names are not ours on PyPI (`lare` there is an unrelated project with its own `lare` package and console script;
the others are unclaimed), so every check keeps the index away from our names: the wheels install with pip
`--no-index` into a fresh virtual environment whose third-party dependencies come from the lock (uv's cache), and
the git and local-clone forms resolve with uv `--offline`. Then each installed distribution is checked to be ours:
summary and version from our pyproject, installed from our wheel file, `<script> --version` printing our line.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Installing the packages in another project"

pytestmark = pytest.mark.slow


def _projects() -> dict[str, dict]:
    """Distribution name -> its `[project]` table, for every workspace member."""
    members = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]
    projects = {}
    for pattern in members:
        for directory in sorted(ROOT.glob(pattern)):
            project = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
            projects[project["name"]] = project
    return projects


PROJECTS = _projects()


def _wheel_name(dist: str) -> str:
    return dist.replace("-", "_")


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` exports UV, the path of its own binary
    if uv is None:
        pytest.fail("uv is not on PATH: `pip install uv` (the README's set-up)")
    return uv


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # No outer environment, and no pip configuration: an index or find-links from the machine must not take part.
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT") and k[:4] != "PIP_"
    }
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- the README section -------------------------------------------------------------------------------------------


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    assert text.count(SECTION) == 1, f"README.md needs exactly one {SECTION!r} section"
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : None if end == -1 else end]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _section(), re.S | re.M)


def _command(what: str, match) -> list[str]:
    """The one command line of the section's bash blocks for which `match(tokens)` holds, as shell tokens."""
    found = [
        tokens
        for block in _blocks("bash")
        for line in block.splitlines()
        if (tokens := shlex.split(line, comments=True)) and match(tokens)
    ]
    assert len(found) == 1, f"README {SECTION!r}: expected one {what} command, found {found}"
    return found[0]


def _toml(what: str, match) -> str:
    found = [block for block in _blocks("toml") if match(block)]
    assert len(found) == 1, f"README {SECTION!r}: expected one {what} pyproject.toml block, found {len(found)}"
    return found[0]


def _is_pip_install(tokens: list[str]) -> bool:
    return tokens[:2] == ["pip", "install"]


def _is_uv_add(tokens: list[str]) -> bool:
    return tokens[:2] == ["uv", "add"]


def test_readme_warns_against_the_public_index():
    section = _section()
    assert "Do not `pip install lare`" in section
    for dist in PROJECTS:
        assert f"`{dist}`" in section, dist  # each name is said to be unclaimed or taken


# --- (a) wheels ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """The README's build command, its `dist` put in a temporary folder; returns that folder's parent (the "clone")."""
    here = tmp_path_factory.mktemp("clone")
    build = _command("`uv build`", lambda t: t[:2] == ["uv", "build"])
    out = build.index("--out-dir") + 1
    assert build[out] == "dist", build
    build[out] = str(here / "dist")
    _run(_uv(), *build[1:])
    wheels = sorted((here / "dist").glob("*.whl"))
    assert {w.name.split("-")[0] for w in wheels} == {_wheel_name(d) for d in PROJECTS}, wheels
    for w in wheels:
        dist = next(d for d in PROJECTS if _wheel_name(d) == w.name.split("-")[0])
        assert w.name.split("-")[1] == PROJECTS[dist]["version"], w.name
    return here


def _third_party(tmp_path: Path, package: str | None) -> Path:
    """The locked third-party dependencies of `package` (all members when None): none of our names, so the index
    (in practice uv's cache, and what CI tested) serves only those."""
    out = tmp_path / f"third-party-{package or 'all'}.txt"
    args = ["--frozen", "--no-hashes", "--no-emit-workspace", "--no-dev", "--no-header", "--output-file", str(out)]
    _run(_uv(), "export", *args, *(["--package", package] if package else []))
    assert not set(re.findall(r"^([A-Za-z0-9_.-]+)==", out.read_text(), re.M)) & set(PROJECTS)
    return out


def _install_third_party(python: Path, tmp_path: Path, package: str | None) -> None:
    _run(_uv(), "pip", "install", "--python", str(python), "-r", str(_third_party(tmp_path, package)))


def _pip_install_wheels(python: Path, clone: Path, patterns: list[str]) -> list[Path]:
    """`pip install <wheel files>` as the README writes it, plus `--no-index`: our names can only be our files."""
    files = []
    for pattern in patterns:
        found = glob.glob(pattern, root_dir=clone)
        assert len(found) == 1, f"{pattern} matches {found} in {clone}"
        files.append(clone / found[0])
    _run(str(python), "-m", "pip", "install", "--no-index", *map(str, files), cwd=clone)
    return files


_INSPECT = """
import importlib.metadata as md, importlib.util, json, sys
out = {}
for dist in sys.argv[1:]:
    d = md.distribution(dist)
    out[dist] = {"version": d.version, "summary": d.metadata["Summary"], "requires": d.requires or [],
                 "direct_url": json.loads(d.read_text("direct_url.json") or "null"),
                 "file": importlib.util.find_spec(dist.replace("-", "_")).origin}
print(json.dumps(out))
"""


def _assert_ours(python: Path, files: list[Path], dists: list[str]) -> None:
    """Each installed distribution is ours: our summary and version, installed from our wheel file, importable from
    site-packages, depending on `latent-core` by name, and its console script printing our `--version` line."""
    info = json.loads(_run(str(python), "-c", _INSPECT, *dists, cwd=python.parent).stdout)
    for dist in dists:
        project, got = PROJECTS[dist], info[dist]
        assert (got["version"], got["summary"]) == (project["version"], project["description"]), (dist, got)
        wheel = next(f for f in files if f.name.startswith(_wheel_name(dist) + "-"))
        assert got["direct_url"] and got["direct_url"]["url"] == wheel.as_uri(), (dist, got["direct_url"])
        assert "site-packages" in got["file"], got["file"]
        assert any(re.match(r"latent-core\b", r) for r in got["requires"]) == (dist != "latent-core"), got
        for script in project.get("scripts", {}):
            shown = _run(str(python.parent / script), "--version", cwd=python.parent).stdout
            assert shown.startswith(f"{dist} {project['version']} (latent-core {project['version']}, torch "), shown


def test_readme_wheel_install_is_ours_without_the_index(wheels, tmp_path):
    """(a) in a fresh virtual environment: first `lare` alone, with only its locked third-party dependencies, by the
    README's command (the two named wheel files, plus `--no-index`), and nothing of the other methods comes along;
    then every wheel (what `latent-apps` needs) the same way."""
    command = _command("wheel `pip install`", lambda t: _is_pip_install(t) and t[-1].endswith(".whl"))
    patterns = command[2:]
    assert sorted(patterns) == ["dist/lare-*.whl", "dist/latent_core-*.whl"], command
    venv = tmp_path / "venv"
    _run(_uv(), "venv", "--seed", "--python", sys.executable, str(venv))  # --seed: the README's `pip`
    python = venv / "bin" / "python"

    _install_third_party(python, tmp_path, "lare")
    files = _pip_install_wheels(python, wheels, patterns)
    _assert_ours(python, files, ["latent-core", "lare"])
    code = (
        "import importlib.util as u, lare.cli; print([m for m in ('heima', 'lavit', 'interpreters') if u.find_spec(m)])"
    )
    assert _run(str(python), "-c", code, cwd=tmp_path).stdout.strip() == "[]", "lare must not pull in other methods"
    _run_lare_example(python, tmp_path)

    _install_third_party(python, tmp_path, None)
    files = _pip_install_wheels(python, wheels, [f"dist/{_wheel_name(d)}-*.whl" for d in PROJECTS])
    _assert_ours(python, files, list(PROJECTS))


def _run_lare_example(python: Path, tmp_path: Path) -> None:
    """The example of packages/lare/README.md (load a LaRe checkpoint, generate with halting) run as written by the
    installed wheels, on a tiny checkpoint made here (its path and image substituted for the README's)."""
    import torch
    from lare import LareConfig, from_llava
    from latent_core.testing import save_tiny_model, tiny_image

    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "packages" / "lare" / "README.md").read_text(), re.S | re.M)
    assert len(blocks) == 1, "packages/lare/README.md needs exactly one python example"
    example = blocks[0]
    assert '"runs/lare/init"' in example and '"photo.jpg"' in example, example
    torch.manual_seed(0)
    model, processor = from_llava(str(save_tiny_model("llava", tmp_path / "llava")), LareConfig(extractor_hidden=48))
    checkpoint = model.save_pretrained(tmp_path / "lare-checkpoint", processor)
    tiny_image(0, 64).save(tmp_path / "photo.png")
    example = example.replace('"runs/lare/init"', repr(str(checkpoint))).replace(
        '"photo.jpg"', repr(str(tmp_path / "photo.png"))
    )
    shown = _run(str(python), "-c", example, cwd=tmp_path).stdout
    assert "| refocusing iterations:" in shown, shown


# --- (b) git and (c) local clone -----------------------------------------------------------------------------------


def _git_head() -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    proc = subprocess.run([git, "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.fixture
def downstream(tmp_path) -> Path:
    """An empty project next to a `latent-reasoning` clone (a link to this checkout), as the README's (c) assumes."""
    (tmp_path / "latent-reasoning").symlink_to(ROOT, target_is_directory=True)
    project = tmp_path / "my-project"
    project.mkdir()
    return project


def _compile(project: Path, source: str, *, uv_sources: bool) -> dict[str, str]:
    """Resolves `source` (a requirements file or pyproject.toml in `project`) offline, third-party pinned to the lock;
    without `uv_sources` uv ignores every `[tool.uv.sources]`, ours included, as pip does. Returns name -> line."""
    constraints = _third_party(project, "lare")
    args = ["--offline", "--quiet", "--no-header", "--no-annotate", "--python", sys.executable]
    args += ["--constraints", str(constraints), *([] if uv_sources else ["--no-sources"]), source]
    lines = {}
    for line in map(str.strip, _run(_uv(), "pip", "compile", *args, cwd=project).stdout.splitlines()):
        if line.startswith("-e "):  # an editable path: named after its folder (packages/<name>)
            lines[Path(line[3:].removeprefix("file://")).name] = line
        elif line:
            lines[re.match(r"[A-Za-z0-9_.-]+", line).group()] = line
    return lines


def _with_repo_url(text: str) -> str:
    return text.replace("<repo url>", ROOT.as_uri())


def _assert_from_git(lines: dict[str, str], head: str) -> None:
    for dist in ("latent-core", "lare"):
        expected = f"{dist} @ git+{ROOT.as_uri()}@{head}#subdirectory=packages/{dist}"
        assert lines.get(dist) == expected, (dist, lines.get(dist))


def _empty_project(project: Path) -> None:
    """The README's downstream `[project]` table, before `uv add`."""
    (project / "pyproject.toml").write_text(
        '[project]\nname = "my-project"\nversion = "0.1.0"\nrequires-python = ">=3.11"\ndependencies = []\n'
    )


def test_readme_git_commands_resolve_to_our_packages(downstream):
    """(b): the pip command and the direct-reference pyproject.toml resolve both our names to the git subdirectories
    under pip's rules (no uv sources); the `uv add` command writes the README's uv pyproject.toml, which does the same.
    `<repo url>` is this checkout (its HEAD commit)."""
    head = _git_head()
    if head is None:
        pytest.skip("not a git checkout: the git form needs this repository's history")

    command = _command("git `pip install`", lambda t: _is_pip_install(t) and "@ git+" in t[-1])
    (downstream / "requirements.in").write_text("".join(_with_repo_url(r) + "\n" for r in command[2:]))
    _assert_from_git(_compile(downstream, "requirements.in", uv_sources=False), head)

    (downstream / "pyproject.toml").write_text(_with_repo_url(_toml("direct-reference", lambda b: "@ git+" in b)))
    _assert_from_git(_compile(downstream, "pyproject.toml", uv_sources=False), head)

    documented = tomllib.loads(_with_repo_url(_toml("uv sources", lambda b: "[tool.uv.sources]" in b)))
    _empty_project(downstream)
    add = _command("git `uv add`", lambda t: _is_uv_add(t) and "@ git+" in t[-1])
    _run(_uv(), "add", "--frozen", *map(_with_repo_url, add[2:]), cwd=downstream)
    written = tomllib.loads((downstream / "pyproject.toml").read_text())
    assert written["project"] == documented["project"], written["project"]
    assert written["tool"]["uv"]["sources"] == documented["tool"]["uv"]["sources"], written["tool"]
    _assert_from_git(_compile(downstream, "pyproject.toml", uv_sources=True), head)


def test_readme_local_clone_commands_resolve_to_our_packages(downstream):
    """(c): the editable pip command (pip's rules) and the `uv add --editable` one resolve both our names to the
    clone's folders."""
    command = _command("editable `pip install`", lambda t: _is_pip_install(t) and "-e" in t)
    assert command[2::2] == ["-e", "-e"], command
    (downstream / "requirements.in").write_text("".join(f"-e {path}\n" for path in command[3::2]))
    results = {"pip": _compile(downstream, "requirements.in", uv_sources=False)}

    _empty_project(downstream)
    add = _command("editable `uv add`", lambda t: _is_uv_add(t) and "--editable" in t)
    _run(_uv(), *add[1:], "--frozen", cwd=downstream)
    sources = tomllib.loads((downstream / "pyproject.toml").read_text())["tool"]["uv"]["sources"]
    clone = "../latent-reasoning/packages"
    assert sources == {d: {"path": f"{clone}/{d}", "editable": True} for d in ("latent-core", "lare")}, sources
    results["uv add"] = _compile(downstream, "pyproject.toml", uv_sources=True)

    for how, lines in results.items():
        for dist in ("latent-core", "lare"):
            line = lines.get(dist, "")
            path = downstream / line[3:].removeprefix("file://")  # relative to the project, or absolute
            assert line.startswith("-e ") and path.resolve() == ROOT / "packages" / dist, (how, dist, line)
