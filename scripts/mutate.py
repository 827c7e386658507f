"""Mutation testing of the core numeric modules with cosmic-ray (`make mutate`).

Each module is mutated in a private copy of the tree (never in place: other runs import the
package from the checkout), and each mutant runs a fast covering test subset in a fresh
process. Mutants come from a fixed set of operators that model realistic one-character bugs
(+/- swapped, * for /, off-by-one constants, < for <=, a negated condition, a loop body
skipped); of those a seeded sample of at most --per-module is run, because one mutant costs
a JAX import plus the tests (5-30 s on a 2-core CPU). Prints one JSON object: counts per
module and each survivor's diff, so survivors can be triaged (README, "Testing").

    .venv/bin/python scripts/mutate.py [--per-module 40] [--modules ddim,masks] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The venv's interpreter: cosmic-ray runs the command through a shell, where `python` may
# be another one (every mutant then "killed" by an ImportError).
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider"

# name -> (module path, covering tests). Subsets are chosen to run in seconds each.
MODULES: dict[str, tuple[str, str]] = {
    "ddim": (
        "dithead_jax/diffusion/ddim.py",
        "tests/test_ddim.py -k 'not dit and not wavefront'",
    ),
    "schedule": (
        "dithead_jax/diffusion/schedule.py",
        "tests/test_diffusion.py",
    ),
    "masks": (
        "dithead_jax/data/masks.py",
        "tests/test_masks_faces_audio.py -k 'mask_ or loss_weights or gaussian'",
    ),
    "audio_features": (
        "dithead_jax/data/audio_features.py",
        "tests/test_masks_faces_audio.py -k 'logmel or align or window or click'",
    ),
    "vqgan_losses": (
        "dithead_jax/training/vqgan_losses.py",
        "tests/test_vqgan_training.py tests/test_numbers.py",
    ),
    "sharding": (
        "dithead_jax/sharding.py",
        "tests/test_sharding.py tests/test_hardware_presets.py tests/test_compiled_sharding.py"
        " -k 'mesh or logical or constrain or dcn or fake or preset or input_batch or unnamed'",
    ),
}

# Operators kept: the rest of cosmic-ray's catalogue (e.g. + -> <<, * -> ^) mostly yields
# type errors that any test kills, and would multiply the run time ~10x.
KEEP = re.compile(
    r"core/("
    r"ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|Mul_Add|Pow_Mul|FloorDiv_Div)"
    r"|ReplaceComparisonOperator_(Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq)"
    r"|NumberReplacer|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr"
    r"|ReplaceOrWithAnd|ReplaceUnaryOperator_USub_UAdd|AddNot|ZeroIterationForLoop"
    r")$"
)


def copy_tree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the checkout, without data/ and demo/."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        if rel.split("/")[0] in ("data", "demo") or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)


def run_module(name: str, src: Path, out: Path, per_module: int, timeout: float) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    module, tests = MODULES[name]
    config = out / f"{name}.toml"
    session = out / f"{name}.sqlite"
    session.unlink(missing_ok=True)
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    cr = [str(Path(sys.executable).parent / "cosmic-ray")]
    subprocess.run([*cr, "init", str(config), str(session)], cwd=src, check=True)
    with use_db(str(session), WorkDB.Mode.open) as db:
        items = list(db.pending_work_items)
        kept = [i for i in items if all(KEEP.match(m.operator_name) for m in i.mutations)]
        sample = set(i.job_id for i in random.Random(name).sample(kept, min(per_module, len(kept))))
        for item in items:
            if item.job_id not in sample:
                db.set_result(
                    item.job_id,
                    WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED),
                )
    env = dict(os.environ, PYTHONPATH=str(src))
    # Unmutated, the tests must pass, or every mutant would count as killed.
    baseline = subprocess.run(
        f"{PYTEST} {tests}", shell=True, cwd=src, env=env, capture_output=True, text=True
    )
    if baseline.returncode != 0:
        raise SystemExit(f"{name}: the covering tests fail unmutated:\n{baseline.stdout[-2000:]}")
    subprocess.run([*cr, "exec", str(config), str(session)], cwd=src, check=True, env=env)
    survivors, counts = [], {"killed": 0, "survived": 0, "incompetent": 0}
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            outcome = TestOutcome(result.test_outcome).value
            counts[outcome] = counts.get(outcome, 0) + 1
            if result.test_outcome == TestOutcome.SURVIVED:
                m = item.mutations[0]
                survivors.append(
                    {
                        "operator": m.operator_name,
                        "occurrence": m.occurrence,
                        "line": m.start_pos[0],
                        "diff": result.diff,
                    }
                )
    return {
        "module": module,
        "tests": tests,
        "mutants_total": len(items),
        "mutants_kept_operators": len(kept),
        "run": sum(counts.values()),
        **counts,
        "survivors": survivors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated names")
    parser.add_argument("--per-module", type=int, default=40, help="mutants run per module")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant")
    parser.add_argument("--out", default="", help="keep configs/sessions here (default: temp)")
    args = parser.parse_args()
    names = [n for n in args.modules.split(",") if n]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        print(f"--modules: unknown {unknown}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dithead-mutate-") as tmp:
        src = Path(tmp) / "src"
        copy_tree(src)
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = {n: run_module(n, src, out, args.per_module, args.timeout) for n in names}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
