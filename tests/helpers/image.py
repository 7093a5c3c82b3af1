"""docker/Dockerfile read as data, for tests that do what the image does without a Docker engine.

`parse_dockerfile` gives stages and instructions; `build_context` lists the files Docker would send
(the working tree through .dockerignore); `apply_copies` lays out what a stage's COPY instructions
put under its WORKDIR; `image_tree` builds the runtime stage's /app in a folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from common.paths import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


# --- the Dockerfile, parsed ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: tuple[str, ...]
    value: str


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV values, unexpanded."""
        values = {}
        for instruction in self.all("ENV"):
            for item in shlex.split(instruction.value):
                key, _, value = item.partition("=")
                values[key] = value
        return values


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    lines, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        lines.append(buffer + line)
        buffer = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        flags, rest = [], rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        if keyword.upper() == "FROM":
            words = rest.split()
            stages.append(Stage(words[2] if len(words) == 3 and words[1].upper() == "AS" else None, words[0]))
        else:
            stages[-1].instructions.append(Instruction(keyword.upper(), tuple(flags), rest))
    return stages


def stage(name: str) -> Stage:
    return next(s for s in parse_dockerfile(DOCKERFILE.read_text()) if s.name == name)


def runtime_stage() -> Stage:
    return parse_dockerfile(DOCKERFILE.read_text())[-1]


def image_command() -> list[str]:
    (cmd,) = runtime_stage().all("CMD")
    assert not runtime_stage().all("ENTRYPOINT")
    return json.loads(cmd.value)


def image_venv() -> str:
    """The venv the runtime stage copies from the builder (`COPY --from=builder <venv> <venv>`)."""
    (copy,) = [c for c in runtime_stage().all("COPY") if "--from=builder" in c.flags]
    source, dest = copy.value.split()
    assert source == dest
    return source


# --- the build context, through .dockerignore -----------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, str, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negated, pattern, _pattern_regex(pattern)))
    return rules


def excluded(relative: str, rules) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, _pattern, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def build_context() -> list[str]:
    """Files of the working tree Docker would send as the build context (relative paths)."""
    rules = dockerignore_rules()
    negations = [pattern for negated, pattern, _ in rules if negated]
    files = []
    for directory, dirnames, filenames in os.walk(REPO_ROOT):
        relative_dir = Path(directory).relative_to(REPO_ROOT).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        # Skip whole excluded trees (.git, .venv, node_modules) that no `!` pattern reaches into.
        dirnames[:] = [d for d in dirnames if not (excluded(prefix + d, rules)
                                                   and not any(n.startswith(prefix + d + "/") for n in negations))]
        files += [prefix + name for name in filenames if not excluded(prefix + name, rules)]
    return sorted(files)


def apply_copies(stage_: Stage, context: list[str], root: Path) -> list[str]:
    """Lay out the files a stage's context COPY instructions put under its WORKDIR, in `root`."""
    copied = []
    for copy in stage_.all("COPY"):
        if any(flag.startswith("--from=") for flag in copy.flags):
            continue
        *sources, dest = copy.value.split()
        for source in sources:
            pattern = source.rstrip("/")
            regex = _pattern_regex(pattern)
            matches = [f for f in context if regex.fullmatch(f) or f.startswith(pattern + "/")]
            assert matches, f"COPY {source}: nothing in the build context matches"
            for relative in matches:
                inside = relative[len(pattern) + 1:] if relative.startswith(pattern + "/") else Path(relative).name
                target = root / dest / inside
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO_ROOT / relative, target)
                copied.append(relative)
    return copied


def image_tree(root: Path) -> Path:
    """The runtime stage's /app, laid out in `root` (plus the empty mlruns/ the image creates)."""
    apply_copies(runtime_stage(), build_context(), root)
    (root / "mlruns").mkdir(exist_ok=True)
    return root
