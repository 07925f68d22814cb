# ruff: noqa: UP031, RUF005
"""The zipapp's front door: refuse an unusable python3 in one line, then put the compiled parts on
the path and hand over to `agent.cli`.

This one file plays two parts in a `flock-VERSION-PLATFORM.pyz` built by `deploy.zipapp`:

* Its source is the archive's `__main__.py`, with `BUILD` filled in. Any python3 a user has runs
  it first, before shiv's bootstrap (which needs Python 3.6+ syntax) extracts ~/.shiv, so it has to
  *parse* on every interpreter that could plausibly be called `python3` or `python`: 2.7 and 3.x.
  Hence no f-strings, no annotations (type comments instead), no `from __future__ import
  annotations` (3.7+). It checks the interpreter against the build and, when it cannot run flock,
  prints one line saying what to do and exits 2; otherwise it runs shiv's `_bootstrap`.
* Inside the extracted site-packages it is the module `agent.bootstrap`, shiv's entry point
  (`agent.bootstrap:main`). CPython-version-specific packages that could not share one directory
  live in `site-packages/_flock_cpXY/`; `main` puts this interpreter's directory at the front of
  sys.path and of PYTHONPATH (which runner subprocesses, started as `python3 -m
  agent.runtime.runner`, inherit) before anything compiled is imported.
"""

import json
import os
import platform
import sys

# deploy.zipapp replaces this line in the archive's __main__.py with the build's facts:
# {"version", "target", "sys_platform", "machine", "pythons": ["3.11", ...], "file"}.
BUILD = None

# Written by deploy.zipapp at the top of the zipapp's site-packages: the same facts as BUILD.
BUILD_INFO = "_flock_build.json"

_SYSTEM_NAMES = {"darwin": "macOS", "linux": "Linux"}

# platform.machine() spellings of one architecture (lower-cased), as the builds name them.
_MACHINES = {"amd64": "x86_64", "aarch64": "arm64"}

# The builds deploy.zipapp makes (deploy/wheels.py's TARGETS), by (sys.platform,
# platform.machine()).
_BUILDS = {("linux", "x86_64"): "linux-x86_64", ("darwin", "arm64"): "macos-arm64"}

# How to get a usable python3 without root or a compiler, by platform ({v}: a supported version).
_INSTALL_HINTS = {
    "darwin": "`brew install python@{v}`, the python.org installer, or `uv python install {v}`",
    "linux": "your distribution's python{v} package, or `uv python install {v}`",
}


def compiled_dir_name(version_info):
    # type: (tuple) -> str
    """`_flock_cp312` for CPython 3.12: where that version's own compiled packages live."""
    return "_flock_cp%d%d" % (version_info[0], version_info[1])


def _supported_list(pythons):
    # type: (list) -> str
    if len(pythons) == 1:
        return pythons[0]
    return "%s or %s" % (", ".join(pythons[:-1]), pythons[-1])


def preflight_problem(build, version_info, implementation, sys_platform, machine, argv):
    # type: (dict, tuple, str, str, str, list) -> str
    """One line telling the user what to do when this interpreter cannot run the build, else "".

    Pure (everything it looks at is an argument) so tests can ask about interpreters they lack.
    """
    # What the user typed to run it (they may have renamed or moved it), to repeat in the advice.
    name = (argv[0] if argv and argv[0] else build.get("file")) or "flock.pyz"
    if sys_platform.startswith("linux"):
        sys_platform = "linux"  # Python 2 says "linux2"
    machine = _MACHINES.get(machine.lower(), machine.lower())
    want_system = build["sys_platform"]
    if (sys_platform, machine) != (want_system, build["machine"]):
        if want_system == "darwin" and sys_platform == "darwin" and machine == "x86_64":
            # An Intel-only python3 on Apple silicon runs under Rosetta and cannot load arm64 MLX.
            return ("flock: %s is the macOS arm64 build, but this python3 (%s) runs as x86_64 "
                    "(Rosetta): run it with an arm64 python3 (Homebrew's /opt/homebrew/bin/python3 "
                    "or the python.org universal2 installer)" % (name, sys.executable))
        here = "%s %s" % (_SYSTEM_NAMES.get(sys_platform, sys_platform), machine)
        other = _BUILDS.get((sys_platform, machine))
        advice = ("use flock-%s-%s.pyz instead" % (build["version"], other) if other else
                  "flock has builds for %s only" % ", ".join(sorted(_BUILDS.values())))
        return ("flock: %s is the %s %s build and this machine is %s: %s"
                % (name, _SYSTEM_NAMES.get(want_system, want_system), build["machine"], here,
                   advice))
    pythons = list(build["pythons"])
    have = "%d.%d" % (version_info[0], version_info[1])
    if implementation != "CPython" or have not in pythons:
        what = "%s %s" % (implementation, ".".join(str(part) for part in version_info[:3]))
        args = " ".join(argv[1:]) or "run"
        best = pythons[-1]  # the newest the build carries: what an installer offers today
        hint = _INSTALL_HINTS.get(want_system, "python.org, or `uv python install {v}`")
        hint = hint.replace("{v}", best)
        return ("flock: this python3 is %s (%s); flock needs CPython %s. Install one (%s) and "
                "run: python%s %s %s" % (what, sys.executable, _supported_list(pythons), hint,
                                          best, name, args))
    return ""


def _check(build):
    # type: (dict) -> None
    problem = preflight_problem(build, tuple(sys.version_info), platform.python_implementation(),
                                sys.platform, platform.machine(), list(sys.argv))
    if problem:
        sys.stderr.write(problem + "\n")
        sys.exit(2)


def _zipapp_main():
    # type: () -> None
    """The archive's __main__: check the interpreter, then let shiv extract and start `main`."""
    if BUILD is not None:
        _check(BUILD)
    import _bootstrap  # shiv's runtime, at the archive's root

    _bootstrap.bootstrap()


def main(argv=None):
    # type: (list) -> int
    """shiv's entry point: this Python's compiled packages first on the path, then the CLI."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = os.path.join(site, BUILD_INFO)
    if os.path.isfile(info):
        # Extracted from a zipapp. Normally __main__ already checked; this covers the extracted
        # tree being started by another interpreter (SHIV_ENTRY_POINT, a copied ~/.shiv).
        with open(info) as handle:
            _check(json.load(handle))
        compiled = os.path.join(site, compiled_dir_name(sys.version_info))
        front = [compiled] if os.path.isdir(compiled) else []
        sys.path[:0] = [path for path in front if path not in sys.path]
        # Children (runners, `flock demo`'s agent) inherit PYTHONPATH. The runner starts in `site`
        # (its cwd comes first on its path), but other children may not, so `site` goes in too.
        # The user's own PYTHONPATH stays, after ours.
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ordered = []  # type: list
        for path in front + [site] + inherited:
            if path not in ordered:
                ordered.append(path)
        os.environ["PYTHONPATH"] = os.pathsep.join(ordered)
    from agent.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    _zipapp_main()
