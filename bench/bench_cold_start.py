"""Cold start of ``python sample.py``: wall time of the whole command and where it goes, one fresh process per run.

Each round runs, for every source tree given (``--tree``, default this checkout; rounds interleaved A B A B so that
the shared machine's load falls on all alike):

- the command as a user runs it, ``python <tree>/sample.py --prompt ... --outdir <tmp>`` with ``PYTHONPATH=<tree>``,
  timed from the parent (spawn to exit): the "wall" row, and its CPU time (user + sys, ``getrusage`` of the
  child; steadier than the wall time on a machine others are using, but with OpenMP threads it counts their
  spin-waiting too, so compare it with ``OMP_NUM_THREADS=1``);
- the same command through a phase-timing child (``--phases-child``, this file run by itself): it imports
  ``ldm.cli.sample``, wraps the functions of each phase (checks, config and model build, weight read and load, the
  acceleration pass's set-up, prompt encoding, the sampling loop, decoding, the model hash, PNG saving) with
  timers that charge wall time exclusively to the innermost phase running, times every ``import`` statement run
  inside the command as "lazy imports", and calls ``ldm.cli.sample.main``. Nothing in ``ldm`` is changed for it.

Python's bytecode cache is what a user has from the second run on (``pip install`` compiles it; an editable
install writes ``__pycache__`` on the first run), so the children run with it: ``PYTHONDONTWRITEBYTECODE`` is taken
out of their environment and each tree gets one unrecorded warm-up run first (which also warms the file cache).
``--bytecode none`` measures the other case, every ``ldm`` module compiled from source: each run starts with the
tree's ``__pycache__`` folders removed and writes none.

The table gives the minimum and the median of each phase over the rounds, per tree; "outside the sampling loop" is
the wall time less the loop. Compare two trees in one run (e.g. main's and a branch's) with two ``--tree``:

    python bench/bench_cold_start.py --rounds 7 --tree /work/main --tree . --out bench/results/cold_start.md
"""
from __future__ import annotations

import sys
import time

if __name__ == "__main__" and sys.argv[1:2] == ["--phases-child"]:
    _T0 = time.time()  # before anything else is imported: the child's own start-up ends here

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

# (module, attribute path, phase): the functions each phase runs through. A missing one (another tree) is skipped.
PHASE_HOOKS = [
    ("ldm.cli.sample", "check_args", "checks"),
    ("ldm.cli.sample", "read_prompts", "checks"),
    ("ldm.cli.sample", "check_seeds", "checks"),
    ("ldm.cli.sample", "_check_loras", "checks"),
    ("ldm.convert.build", "read_state_dict", "weights: open file"),
    ("ldm.convert.build", "infer_config", "config"),
    ("ldm.convert.build", "load_config", "config"),
    ("ldm.convert.build", "build_model", "model build"),
    ("ldm.convert.build", "load_weights", "weights: read + copy"),
    ("ldm.pipeline", "_Pipeline._configure", "accel set-up"),
    ("ldm.pipeline", "_Pipeline._place_model", "accel set-up"),
    ("ldm.accel", "store_weights_in_", "accel set-up"),
    ("ldm.pipeline", "_Pipeline.encode_conditioning", "prompt encoding"),
    ("ldm.diffusion.samplers", "sample", "sampling loop"),
    ("ldm.pipeline", "_Pipeline._decode", "decode"),
    ("ldm.pipeline", "tensor_to_images", "decode"),
    ("ldm.io", "model_hash", "model hash"),
    ("ldm.cli.sample", "save_new_png", "PNG save"),
    ("ldm.cli.sample", "make_grid", "grid"),
]
PHASES = ["python start-up", "imports", "checks", "config", "model build", "weights: open file",
          "weights: read + copy", "accel set-up", "prompt encoding", "sampling loop", "decode", "model hash",
          "PNG save", "grid", "lazy imports", "other", "exit"]


# ------------------------------------------------------------------------------------------------------------
# the child: one sample.py run with phase timers
# ------------------------------------------------------------------------------------------------------------

class _Clock:
    """Exclusive wall time per phase: the innermost phase running is charged, like a profiler's self time."""

    def __init__(self, start: float):
        self.totals: dict[str, float] = {}
        self.stack = ["other"]
        self.last = start

    def enter(self, phase: str) -> None:
        now = time.time()
        self.totals[self.stack[-1]] = self.totals.get(self.stack[-1], 0.0) + now - self.last
        self.stack.append(phase)
        self.last = now

    def leave(self) -> None:
        now = time.time()
        phase = self.stack.pop()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


def _timed(clock: _Clock, phase: str, fn):
    def wrapper(*args, **kwargs):
        clock.enter(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            clock.leave()
    wrapper.__wrapped__ = fn
    return wrapper


def _install_hooks(clock: _Clock, done: set) -> None:
    """Wrap every hook whose module is loaded now (once); modules imported later are wrapped on their import."""
    for module_name, path, phase in PHASE_HOOKS:
        module = sys.modules.get(module_name)
        if module is None or (module_name, path) in done:
            continue
        done.add((module_name, path))
        *owners, attr = path.split(".")
        owner = module
        for name in owners:
            owner = getattr(owner, name, None)
        if owner is None or not hasattr(owner, attr):
            continue
        original = getattr(owner, attr)
        setattr(owner, attr, _timed(clock, phase, original))
        if not owners:  # re-exports of a module-level function (e.g. ldm.convert.load_model) keep the original
            for other in list(sys.modules.values()):
                if getattr(other, "__name__", "").startswith("ldm") and other is not module \
                        and getattr(other, attr, None) is original and other.__name__ != "ldm.cli.sample":
                    setattr(other, attr, getattr(owner, attr))


def phases_child(out_path: str, argv: list[str]) -> int:
    import builtins

    t_main = time.time()
    import ldm.cli.sample as sample_cli
    t_imported = time.time()
    clock = _Clock(t_imported)
    done: set = set()
    _install_hooks(clock, done)
    real_import = builtins.__import__
    depth = [0]

    def timed_import(*args, **kwargs):
        if depth[0]:
            return real_import(*args, **kwargs)
        depth[0] += 1
        clock.enter("lazy imports")
        try:
            return real_import(*args, **kwargs)
        finally:
            clock.leave()
            depth[0] -= 1
            _install_hooks(clock, done)  # before `from x import y` reads y from the new module

    builtins.__import__ = timed_import
    try:
        status = sample_cli.main(argv)
    finally:
        builtins.__import__ = real_import
    clock.leave()  # closes "other"
    record = {"t0": _T0, "t_main": t_main, "t_imported": t_imported, "t_end": time.time(), "status": status,
              "phases": clock.totals}
    Path(out_path).write_text(json.dumps(record))
    sys.stdout.flush()
    common = sys.modules["ldm.cli.common"]  # what the tree's sample.py does at its end
    if getattr(common, "exit_now", None) is not None:
        common.exit_now(status)
    exiting = getattr(common, "exiting", None)
    return status if exiting is None else exiting(status)


# ------------------------------------------------------------------------------------------------------------
# the parent
# ------------------------------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], tree: Path, bytecode: str = "cached") -> tuple[float, float, float, str]:
    """(spawn time, seconds from spawn to exit, CPU seconds, output) of one run; the child imports ldm from
    ``tree``, with Python's bytecode cache (``bytecode="cached"``) or with none of the tree's (``"none"``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    if bytecode == "none":
        for folder in tree.glob("**/__pycache__"):
            shutil.rmtree(folder, ignore_errors=True)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    start, t, cpu = time.time(), time.perf_counter(), _cpu_seconds()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} (PYTHONPATH={tree}) exited with {proc.returncode}:\n"
                         f"{proc.stderr[-3000:]}")
    return start, wall, cpu, proc.stdout + proc.stderr


def run_rounds(trees: list[Path], rounds: int, sample_args: list[str], phases: bool,
               bytecode: str = "cached") -> dict[Path, dict]:
    results = {tree: {"wall": [], "cpu": [], "phase_runs": []} for tree in trees}
    with tempfile.TemporaryDirectory(prefix="cold_start_") as tmp:
        for tree in trees:  # the warm-up: writes the bytecode cache and reads every file once
            _run([sys.executable, str(tree / "sample.py"), "--outdir", str(Path(tmp) / "warm-up"), *sample_args],
                 tree, bytecode)
        for round_ in range(rounds):
            for tree in trees:
                outdir = Path(tmp) / "out"
                shutil.rmtree(outdir, ignore_errors=True)
                base = ["--outdir", str(outdir), *sample_args]
                _, wall, cpu, _ = _run([sys.executable, str(tree / "sample.py"), *base], tree, bytecode)
                results[tree]["wall"].append(wall)
                results[tree]["cpu"].append(cpu)
                line = f"round {round_} {tree}: wall {wall:.2f} s, CPU {cpu:.2f} s"
                if phases:
                    shutil.rmtree(outdir, ignore_errors=True)
                    record_path = Path(tmp) / "phases.json"
                    start, child_wall, _, _ = _run([sys.executable, __file__, "--phases-child", str(record_path),
                                                 *base], tree, bytecode)
                    record = json.loads(record_path.read_text())
                    p = dict(record["phases"])
                    p["python start-up"] = record["t0"] - start
                    p["imports"] = record["t_imported"] - record["t0"]  # this file's stdlib imports + ldm.cli.sample
                    p["exit"] = start + child_wall - record["t_end"]
                    p["wall"] = child_wall
                    results[tree]["phase_runs"].append(p)
                    line += f", phases run {child_wall:.2f} s (loop {p.get('sampling loop', 0):.2f} s)"
                print(line, file=sys.stderr, flush=True)
    return results


def _stats(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}"


def report(results: dict[Path, dict], trees: list[Path]) -> str:
    names = [str(t) for t in trees]
    headers = ["phase (s, min / median)", *names]
    rows = []
    for phase in PHASES:
        cells = []
        for tree in trees:
            runs = results[tree]["phase_runs"]
            cells.append(_stats([r.get(phase, 0.0) for r in runs]) if runs else "")
        if any(c and c != "0.00 / 0.00" for c in cells):
            rows.append([phase, *cells])
    for tree in trees:
        for run in results[tree]["phase_runs"]:
            run["outside the loop"] = run["wall"] - run.get("sampling loop", 0.0)
    if any(results[t]["phase_runs"] for t in trees):
        rows.append(["**phase-timed run, wall**", *[_stats([r["wall"] for r in results[t]["phase_runs"]])
                                                    if results[t]["phase_runs"] else "" for t in trees]])
        rows.append(["**outside the sampling loop**", *[_stats([r["outside the loop"] for r in
                                                               results[t]["phase_runs"]])
                                                       if results[t]["phase_runs"] else "" for t in trees]])
    rows.append(["**`python sample.py` wall (plain run)**", *[_stats(results[t]["wall"]) for t in trees]])
    rows.append(["`python sample.py` CPU time, user + sys (plain run)", *[_stats(results[t]["cpu"]) for t in trees]])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--phases-child"]:
        return phases_child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, default=None,
                        help="source tree whose sample.py and ldm run (repeatable; default: this checkout)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per tree (default %(default)s)")
    parser.add_argument("--prompt", default="two red circles above a blue square")
    parser.add_argument("--no-phases", dest="phases", action="store_false",
                        help="only the plain runs (no phase-timing runs)")
    parser.add_argument("--bytecode", choices=["cached", "none"], default="cached",
                        help="run with Python's bytecode cache, as from a user's second run (default), or with "
                             "every ldm module compiled from source")
    parser.add_argument("--out", default=None, help="markdown report (e.g. bench/results/cold_start.md)")
    args, extra = parser.parse_known_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    repo = Path(__file__).resolve().parents[1]
    trees = [t.resolve() for t in (args.tree or [repo])]
    for tree in trees:
        if not (tree / "sample.py").is_file() or not (tree / "ldm").is_dir():
            raise SystemExit(f"--tree {tree} has no sample.py and ldm/: pass a checkout of this project")
    load_start = os.getloadavg()
    results = run_rounds(trees, args.rounds, ["--prompt", args.prompt, *extra], args.phases, args.bytecode)
    table = report(results, trees)
    print(table)
    if args.out:
        sys.path.insert(0, str(repo / "bench"))
        import common

        info = common.machine_info(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)), "sample.py default")
        info["load average at start"] = " ".join(f"{x:.1f}" for x in load_start)
        info["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        info["rounds"] = f"{args.rounds} per tree, interleaved, after one warm-up run per tree"
        info["bytecode"] = {"cached": "cached (written by the warm-up run)",
                            "none": "none: every ldm module compiled from source in every run"}[args.bytecode]
        common.write_report(args.out, "Cold start of python sample.py (demo model, 4 images, 20 steps)", info, table,
                            notes=["phases are exclusive wall time (an inner phase is not counted in its caller); "
                                   "'lazy imports' are the import statements run inside the command, 'imports' "
                                   "the import of ldm.cli.sample, 'other' what no phase covers (argument parsing, "
                                   "progress bars, sigmas, noise), 'exit' the interpreter's shutdown",
                                   "the phase-timed run's wall is a little above the plain run's (the timers)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
