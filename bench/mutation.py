"""Mutation score of the core modules with mutmut: the share of small code changes (mutants) the tests catch.

    .venv/bin/python bench/mutation.py MODULE[:FUNC,...][=TEST,...] ... [--max-children 2]
    make mutation                                   # every core module (MUTATION_MODULES in the Makefile)
    make mutation MUTATION_MODULES=evaluation/bon.py

Each module runs in its own scratch folder (`runs/mutation/<module>/`, reused so an interrupted run resumes) with
mutmut configured for it alone: only that file is mutated (only the named functions with `:FUNC,...`; a method as
`Class.method`), and only its
own test files run (`=TEST,...`, else the table below). Prints killed / total per module, with the survivors by
name; mutants listed in `bench/mutation_equivalent.yaml` (each with the reason it cannot change behaviour) are left
out of the total. Not part of `make test`: it takes minutes to hours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "runs" / "mutation"
EQUIVALENT_FILE = ROOT / "bench" / "mutation_equivalent.yaml"
NOT_COPIED = {".git", ".venv", "runs", "mutants", "pyproject.toml", "models", "data", "plots", "rl_data",
              "rl_data_with_baseline"}

# The tests that target each core module (the fast ones: every mutant reruns the tests that call its function).
TESTS_FOR = {
    "reward_plugins/config_loader.py": ["tests/test_config_loader.py", "tests/test_config.py"],
    "evaluation/bon.py": ["tests/test_bon_estimator.py", "tests/test_bon_edges.py", "tests/test_bon_analysis.py"],
    "reward_plugins/ensemble.py": ["tests/test_ensemble_math.py", "tests/test_ensemble_plugin.py",
                                   "tests/test_ensemble_members.py", "tests/test_cheap_ensembles.py"],
    "trl_ext/ppo.py": ["tests/test_ppo.py", "tests/test_ppo_maths.py", "tests/test_ppo_fidelity.py",
                       "tests/test_meta_device.py", "tests/test_ppo_value_init.py"],
    "reward_plugins/vrcli/scoring.py": ["tests/test_vrcli_math.py", "tests/test_vrcli_numbers.py",
                                        "tests/test_vrcli_plugin.py"],
    "reward_plugins/vrcli/plan.py": ["tests/test_vrcli_math.py", "tests/test_vrcli_plugin.py"],
    "reward_plugins/vrcli/prompts.py": ["tests/test_vrcli_plugin.py", "tests/test_vrcli_tokenization.py"],
    "reward_plugins/vrcli/baselines.py": ["tests/test_vrcli_numbers.py", "tests/test_vrcli_plugin.py"],
    "reward_plugins/vrcli/plugin.py": ["tests/test_vrcli_plugin.py", "tests/test_vrcli_numbers.py"],
    "reward_plugins/logprobs.py": ["tests/test_vrcli_numbers.py", "tests/test_vrcli_plugin.py",
                                   "tests/test_vrcli_tokenization.py"],
    "reward_plugins/monitor.py": ["tests/test_monitor.py", "tests/test_monitor_maths.py"],
    "openrlhf_ext/reward_client.py": ["tests/test_reward_client_values.py", "tests/test_reward_client.py",
                                      "tests/test_wire_faults.py"],
    "openrlhf_ext/server_protocol.py": ["tests/test_server_protocol.py", "tests/test_server_protocol_values.py",
                                        "tests/test_serve.py", "tests/test_wire_faults.py"],
    "reward_plugins/placement.py": ["tests/test_placement.py", "tests/test_placement_config.py"],
}
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


@dataclass
class Target:
    """One module to mutate: its file, the functions to mutate (all when empty) and the tests to run."""

    path: str
    functions: list[str]
    tests: list[str]

    @classmethod
    def parse(cls, text: str) -> Target:
        spec, _, tests = text.partition("=")
        path, _, functions = spec.partition(":")
        if not (ROOT / path).is_file():
            raise SystemExit(f"mutation: {path}: no such file")
        chosen = [t for t in tests.split(",") if t] or TESTS_FOR.get(path)
        if not chosen:
            raise SystemExit(f"mutation: {path}: no test files known; name them: {path}=tests/test_a.py,...")
        return cls(path, [f for f in functions.split(",") if f], chosen)

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    @property
    def prefixes(self) -> list[str]:
        """mutmut's mutant-name prefixes of the chosen functions (`x_func`, and `xǁClassǁmethod` for methods)."""
        return [f"{self.module}." + ("xǁ" + f.replace(".", "ǁ") if "." in f else "x_" + f) + "__mutmut_"
                for f in self.functions]

    @property
    def names(self) -> list[str]:
        """mutmut's mutant-name globs for the chosen functions."""
        return [prefix + "*" for prefix in self.prefixes]

    def mutmut_config(self) -> str:
        package = self.path.split("/", 1)[0]
        also_copy = sorted(p.name for p in ROOT.iterdir() if p.name not in NOT_COPIED and p.name != package)
        return "\n[tool.mutmut]\n" + "\n".join([
            f"source_paths = {json.dumps([package])}",
            f"only_mutate = {json.dumps([self.path])}",
            f"also_copy = {json.dumps(also_copy)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(self.tests)}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider"]',
            "use_git_change_detection = false",
        ]) + "\n"


def prepare(target: Target) -> Path:
    """The scratch folder: links to the repository's files, and pyproject.toml with mutmut set for this target."""
    work = SCRATCH / target.module
    work.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        link = work / entry.name
        if entry.name not in NOT_COPIED and not link.exists():
            link.symlink_to(entry)
    config = (ROOT / "pyproject.toml").read_text() + target.mutmut_config()
    tests = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((ROOT / "tests").rglob("*.py")))).hexdigest()
    pyproject, stamp = work / "pyproject.toml", work / "tests.sha256"
    if not pyproject.exists() or pyproject.read_text() != config or not stamp.exists() or stamp.read_text() != tests:
        shutil.rmtree(work / "mutants", ignore_errors=True)  # other tests or settings: mutmut's verdicts are stale
        pyproject.write_text(config)
        stamp.write_text(tests)
    return work


def results(work: Target, folder: Path) -> dict[str, str]:
    """mutant name -> status, read from mutmut's own result files."""
    from mutmut.stats import status_by_exit_code  # noqa: PLC0415 - a development-only dependency

    meta = folder / "mutants" / (work.path + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    selected = {k: v for k, v in codes.items() if not work.functions or k.startswith(tuple(work.prefixes))}
    return {name: status_by_exit_code[code] for name, code in selected.items()}


def load_equivalent() -> dict[str, str]:
    data = yaml.safe_load(EQUIVALENT_FILE.read_text()) if EQUIVALENT_FILE.exists() else None
    return {str(k): str(v) for k, v in (data or {}).items()}


def run(target: Target, max_children: int) -> tuple[int, int, list[str]]:
    folder = prepare(target)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "mutmut", "run", f"--max-children={max_children}", *target.names]
    code = subprocess.run(command, cwd=folder, env=env).returncode
    if code != 0:
        raise SystemExit(f"mutation: mutmut failed on {target.path} (exit {code}); see the output above")
    statuses = results(target, folder)
    equivalent = load_equivalent()
    counted = {k: v for k, v in statuses.items() if k not in equivalent}
    killed = sum(v in KILLED for v in counted.values())
    survivors = sorted(k for k, v in counted.items() if v not in KILLED)
    for name in survivors:
        print(f"  {counted[name]}: {name}")
    if survivors:
        print(f"  (see one: cd {folder.relative_to(ROOT)} && {Path(sys.executable).name} -m mutmut show NAME)")
    listed = [k for k in statuses if k in equivalent]
    print(f"  {len(listed)} equivalent mutant(s) left out (bench/mutation_equivalent.yaml); "
          f"statuses: {dict(Counter(statuses.values()))}")
    return killed, len(counted), survivors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=list(TESTS_FOR), metavar="MODULE[:FUNC,...][=TEST,...]")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    args = parser.parse_args(argv)
    targets = [Target.parse(t) for t in args.targets]
    rows = []
    for target in targets:
        print(f"== {target.path}{':' + ','.join(target.functions) if target.functions else ''} "
              f"({', '.join(target.tests)})", flush=True)
        killed, total, _ = run(target, args.max_children)
        rows.append((target.path, killed, total))
    print(f"\n{'module':45s} {'killed':>7s} {'total':>6s} {'score':>7s}")
    for path, killed, total in rows:
        print(f"{path:45s} {killed:7d} {total:6d} {100 * killed / max(total, 1):6.1f}%")
    killed, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'all':45s} {killed:7d} {total:6d} {100 * killed / max(total, 1):6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
