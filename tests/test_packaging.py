"""What the image is built from: cog.yaml, requirements.txt, the docs' build lines and
.dockerignore agree with each other and with the cog/coglet these tests run; set-up refuses
a cog that would fetch URL inputs itself."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import cog.types
import pytest
import torch
import yaml
from helpers import face_photo, png_bytes, run_python

from codeformer.config import PROJECT_ROOT
from codeformer.errors import ConfigError
from codeformer.serving.client import data_uri
from codeformer.serving.fetch import check_fetching_deferred, defer_cog_fetching
from predict import Predictor

MANAGED = ("cog", "coglet")  # the packages `cog build` installs itself, not from requirements.txt


def _pins(requirements: str) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by lower-case name."""
    pins = {}
    for line in requirements.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+).*", line)
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def packaging_mismatches(files: dict[str, str], installed: dict[str, str | None]) -> list[str]:
    """Each way the image's build would run another cog, coglet or CUDA than the one tested.

    ``files``: the texts of cog.yaml and requirements.txt by file name, and under "docs" the
    README and the docs/ pages.
    ``installed``: the versions this process runs (``cog``, ``coglet``, and ``cuda``, the
    CUDA version the installed torch wheel was built for, or None for a CPU-only wheel).
    """
    build = yaml.safe_load(files["cog.yaml"])["build"]
    pins = _pins(files["requirements.txt"])
    sdk, cuda, coglet_wheel = (
        str(build.get("sdk_version")),
        str(build.get("cuda")),
        f"pypi:{pins.get('coglet')}",
    )
    problems = [
        f"requirements.txt pins {package}=={pins.get(package)}; installed {installed[package]}"
        for package in MANAGED
        if pins.get(package) != installed[package]
    ]
    if sdk != pins.get("cog"):
        problems.append(f"cog.yaml build.sdk_version is {sdk}; requirements.txt pins cog=={pins.get('cog')}")
    if installed["cuda"] is not None and cuda != installed["cuda"]:
        problems.append(f"cog.yaml build.cuda is {cuda}; the torch wheel is for CUDA {installed['cuda']}")
    # every `cog build` / `cog push` command the docs show (in their code blocks) pins coglet
    code = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", files["docs"], flags=re.M | re.S))
    for command in re.findall(r"(?:\S+=\S+\s+)*cog (?:build|push)\b", code):
        if f"COGLET_WHEEL={coglet_wheel}" not in command:
            problems.append(f"the docs run {command.strip()!r} without COGLET_WHEEL={coglet_wheel}")
    return problems


def _project_files() -> dict[str, str]:
    files = {name: (PROJECT_ROOT / name).read_text() for name in ("cog.yaml", "requirements.txt")}
    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    return {**files, "docs": "\n".join(page.read_text() for page in pages)}


def _installed() -> dict[str, str | None]:
    return {"cog": version("cog"), "coglet": version("coglet"), "cuda": torch.version.cuda}


def test_build_files_pin_the_cog_coglet_and_cuda_that_the_tests_run() -> None:
    files = _project_files()
    assert packaging_mismatches(files, _installed()) == []
    assert "COGLET_WHEEL=pypi:0" in files["docs"]  # the docs do show the build


@pytest.mark.parametrize(
    ("file", "old", "new", "complaint"),
    [
        ("requirements.txt", "cog==", "cog==9.", "requirements.txt pins cog"),
        ("requirements.txt", "coglet==", "coglet==9.", "requirements.txt pins coglet"),
        ("cog.yaml", 'sdk_version: "', 'sdk_version: "9.', "build.sdk_version"),
        ("cog.yaml", 'cuda: "', 'cuda: "1', "build.cuda"),
        ("docs", "COGLET_WHEEL=pypi:", "COGLET_WHEEL=pypi:9.", "without COGLET_WHEEL"),
    ],
)
def test_a_mismatched_pin_is_reported(file: str, old: str, new: str, complaint: str) -> None:
    files = _project_files()
    installed = _installed()
    # on a CPU-only torch, as if it were the CUDA wheel cog.yaml names (so the CUDA check runs)
    installed["cuda"] = installed["cuda"] or str(yaml.safe_load(files["cog.yaml"])["build"]["cuda"])
    assert old in files[file]
    files[file] = files[file].replace(old, new)
    problems = packaging_mismatches(files, installed)
    assert any(complaint in problem for problem in problems), problems


def test_a_readme_build_line_without_coglet_pin_is_reported() -> None:
    files = _project_files()
    files["docs"] += "\n```bash\ncog push r8.im/someone/codeformer\n```\n"
    problems = packaging_mismatches(files, _installed())
    assert problems == ["the docs run 'cog push' without COGLET_WHEEL=pypi:" + version("coglet")]


# -- URL inputs reach run() unfetched ------------------------------------------------------
def test_the_running_cog_hands_urls_through_unfetched() -> None:
    defer_cog_fetching()
    check_fetching_deferred()  # raises if not
    url = "https://127.0.0.1/a.jpg"
    assert cog.types.Path.validate(url) == url
    assert isinstance(cog.types.Path.validate("data/1.jpg"), cog.types.Path)  # local paths as before


@pytest.fixture
def cog_without_the_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    """cog's own Path.validate, as a cog whose normalisation bypasses the patch would leave it."""
    defer_cog_fetching()
    original = cog.types.Path.validate.__func__.__wrapped__
    monkeypatch.setattr(cog.types.Path, "validate", classmethod(original))


@pytest.mark.usefixtures("cog_without_the_patch")
def test_a_cog_that_would_fetch_urls_itself_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"would download user URLs itself.*COGLET_WHEEL"):
        check_fetching_deferred()


@pytest.mark.usefixtures("cog_without_the_patch")
def test_setup_fails_on_such_a_cog_before_loading_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from codeformer import Restorer

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("setup loaded the nets before checking cog")

    monkeypatch.setattr(Restorer, "load", load)
    with pytest.raises(ConfigError, match="URL input"):
        Predictor().setup()


# -- .dockerignore -------------------------------------------------------------------------
def _dockerignore_regexes() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, Docker's way: ``**`` any folders, ``*`` within one."""
    rules = []
    for raw in (PROJECT_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((exclude, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` (relative, with /) out: the last rule that
    matches it or a folder above it decides."""
    parents = path.split("/")
    candidates = ["/".join(parents[: i + 1]) for i in range(len(parents))]
    excluded = False
    for exclude, regex in _dockerignore_regexes():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = exclude
    return excluded


def test_the_development_side_stays_out_of_the_image() -> None:
    for path in ("tests/test_packaging.py", "benchmarks/run_bench.py", "requirements-dev.txt", ".ci/run"):
        assert dockerignored(path), path
    for path in ("predict.py", "cog.yaml", "requirements.txt", "data/1.jpg", "weights/codeformer.pth"):
        assert not dockerignored(path), path
    assert dockerignored("weights/.codeformer.pth.part")


@pytest.mark.process
def test_the_image_keeps_every_file_the_server_imports(weights_dir: Path, tmp_path: Path) -> None:
    """Set up the Predictor and serve one request in a fresh process, then list the project
    files it imported: none may be left out of the image."""
    photo = data_uri(png_bytes(face_photo(256, 256)), name="face.png")  # a face the random detector finds
    script = (
        "import json, sys\n"
        "from predict import Predictor\n"
        "from codeformer.config import RequestOptions\n"
        "predictor = Predictor()\n"
        "predictor.setup()\n"
        "photo = sys.stdin.read()\n"
        "predictor.serve_request([photo], RequestOptions.parse(0.5, 'baseline', 'safe', 'none'))\n"
        "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))\n"
    )
    done = run_python(
        script, stdin=photo, env={"CODEFORMER_WEIGHTS_DIR": str(weights_dir), "TMPDIR": str(tmp_path)}
    )
    files = [Path(name).resolve() for name in json.loads(done.stdout.splitlines()[-1]) if name]
    imported = sorted(
        name
        for name in (str(f.relative_to(PROJECT_ROOT)) for f in files if f.is_relative_to(PROJECT_ROOT))
        if not name.startswith(".venv/")  # the image installs its packages itself
    )
    assert "predict.py" in imported and "codeformer/pipeline.py" in imported
    assert [name for name in imported if dockerignored(name)] == []
