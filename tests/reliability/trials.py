"""Trials that need whole processes: kill -9 while caching or training, a full disk (tmpfs),
two builders at once. Each returns a record {"outcome": ..., "lost": ..., ...} for one trial;
tests/reliability/test_rel_kill.py runs a few, benchmarks/reliability_trials.py many."""
from __future__ import annotations

import random
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import torch

from faults import (ROOT, cache_files, env, in_tmpfs, kill9, last_line, python, run, start, temp_files, wait_for,
                    write_cache_config, write_fit_config)

CACHE_CMD = ("-m", "sae_lit.data.cache", "--quiet", "--config")


def _shards(cache_dir) -> list[str]:
    d = Path(cache_dir)
    return sorted(p.name for p in d.glob("*.tar")) if d.exists() else []


def _temps(cache_dir, prefix: str = "") -> list[str]:
    d = Path(cache_dir)
    return [p.name for p in d.glob(f".{prefix}*.tmp*")] if d.exists() else []


# --- kill -9 while caching -----------------------------------------------------------------------


def _computing(cache_dir) -> bool:
    """The model has started on the first shard (its temporary file, or the shard, exists)."""
    return bool(_temps(cache_dir, "train-000000") or _shards(cache_dir))


def cache_reference(workdir, cache_kwargs) -> tuple[dict, float]:
    """Build the reference cache in a subprocess: (its files, seconds from the start of the
    first shard to the end)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(cache_kwargs, cache_dir=str(workdir / "reference"))
    cfg = write_cache_config(workdir / "reference.yaml", kwargs)
    proc = start(python(*CACHE_CMD, cfg))
    wait_for(lambda: _computing(kwargs["cache_dir"]), proc)
    t0 = time.monotonic()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"reference cache build failed: {err[-2000:]}")
    return cache_files(kwargs["cache_dir"]), time.monotonic() - t0


def cache_kill_trial(workdir, cache_kwargs, reference: dict, when: str, build_seconds: float = 1.0,
                     seed: int = 0) -> dict:
    """Start a cache build, kill -9 it at `when`, build again; compare every file with the
    reference. when: "start" (the build has begun: manifest written, model loading),
    "shards:K" (K shards on disk), "temp:K" (shard K half written), "finalize" (every shard on
    disk: statistics / manifest being written), "random" (a uniform moment from the first
    shard to the end)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = workdir / "cache"
    kwargs = dict(cache_kwargs, cache_dir=str(cache_dir))
    cfg = write_cache_config(workdir / "cache.yaml", kwargs)
    n_shards = len([k for k in reference if k.endswith(".tar")])
    kind, _, arg = when.partition(":")
    proc = start(python(*CACHE_CMD, cfg))
    if kind == "shards":
        reached = wait_for(lambda: len(_shards(cache_dir)) >= int(arg), proc)
    elif kind == "temp":
        name = sorted(k for k in reference if k.endswith(".tar"))[int(arg)]
        reached = wait_for(lambda: bool(_temps(cache_dir, name)), proc)
    elif kind == "finalize":
        reached = wait_for(lambda: len(_shards(cache_dir)) >= n_shards, proc)
    elif kind == "start":
        reached = wait_for(lambda: (cache_dir / "manifest.json").exists(), proc)
    else:
        reached = wait_for(lambda: _computing(cache_dir), proc)
        time.sleep(random.Random(seed).uniform(0, 0.9 * build_seconds))
    interrupted = kill9(proc)
    state = {"shards_at_kill": len(_shards(cache_dir)), "temps_at_kill": len(_temps(cache_dir))}
    resumed = run(python(*CACHE_CMD, cfg))
    identical = resumed.returncode == 0 and cache_files(cache_dir) == reference
    record = {"when": when, "reached": reached, "interrupted": interrupted, **state, "resumed_rc": resumed.returncode,
              "identical": identical, "temps_after": temp_files(cache_dir)}
    record["outcome"] = "identical" if identical and not record["temps_after"] else "DIFFERENT"
    record["lost"] = "none" if identical else "?"
    shutil.rmtree(cache_dir, ignore_errors=True)
    return record


# --- kill -9 while training ---------------------------------------------------------------------------


def _exported(root) -> dict[str, bytes]:
    """The newest exported SAE under a run folder: {file: bytes}."""
    folders = sorted(Path(root).rglob("sae/cfg.json"), key=lambda p: p.stat().st_mtime)
    if not folders:
        return {}
    return {p.name: p.read_bytes() for p in sorted(folders[-1].parent.iterdir())}


def _steps_saved(root) -> int:
    steps = [int(p.stem.split("step=")[1]) for p in Path(root).rglob("*step=*.ckpt") if "tmp" not in p.name]
    return max(steps, default=0)


def train_reference(workdir, cache_kwargs, max_steps: int = 40) -> tuple[dict, float, Path]:
    """The uninterrupted run: (exported files, seconds from its first checkpoint to the end, config)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "straight"
    config = write_fit_config(workdir / "fit.yaml", cache_kwargs, root, max_steps=max_steps, every=1, save_top_k=-1)
    proc = start(python("main.py", "fit", "--config", config))
    wait_for(lambda: _steps_saved(root) >= 1, proc)
    t0 = time.monotonic()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"reference training run failed: {err[-3000:]}")
    return _exported(root), time.monotonic() - t0, config


def train_kill_trial(workdir, config, reference: dict, when: str, seconds: float = 1.0, seed: int = 0) -> dict:
    """Start `python main.py fit`, kill -9 it at `when` ("step:K": once the checkpoint of step K
    is on disk; "random": a uniform moment after the first checkpoint), resume from last.ckpt
    (or start again if there is none) and compare the exported SAE with the reference."""
    root = Path(workdir) / "run"
    Path(workdir).mkdir(parents=True, exist_ok=True)
    args = ("main.py", "fit", "--config", config, f"--trainer.default_root_dir={root}")
    kind, _, arg = when.partition(":")
    proc = start(python(*args))
    if kind == "step":
        reached = wait_for(lambda: _steps_saved(root) >= int(arg), proc)
    else:
        reached = wait_for(lambda: _steps_saved(root) >= 1, proc)
        time.sleep(random.Random(seed).uniform(0, seconds))
    interrupted = kill9(proc)
    step = _steps_saved(root)
    last = sorted(root.rglob("last.ckpt"))
    loadable = all(_loads(p) for p in root.rglob("*.ckpt"))
    resumed = run(python(*args, *(["--ckpt_path", str(last[-1])] if last else [])))
    got = _exported(root)
    identical = resumed.returncode == 0 and got == reference
    record = {"when": when, "reached": reached, "interrupted": interrupted, "step_at_kill": step,
              "checkpoints_loadable": loadable, "resumed_rc": resumed.returncode, "identical": identical,
              "temps_after": temp_files(root), "stderr": "" if resumed.returncode == 0 else last_line(resumed.stderr)}
    record["outcome"] = "identical" if identical and loadable else "DIFFERENT"
    record["lost"] = "none" if identical else "?"
    shutil.rmtree(root, ignore_errors=True)
    return record


def _loads(path) -> bool:
    try:
        torch.load(path, weights_only=True, map_location="cpu")
        return True
    except Exception:  # noqa: BLE001 - any failure to read is the finding
        return False


# --- a full disk (tmpfs) ---------------------------------------------------------------------------------


def disk_full_cache_trial(workdir, cache_kwargs, reference: dict, size_kb: int) -> dict:
    """Build the cache on a tmpfs of `size_kb`; grow the disk; build again; compare."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mnt, out = workdir / "mnt", workdir / "out"
    kwargs = dict(cache_kwargs, cache_dir=str(mnt / "cache"))
    cfg = write_cache_config(workdir / "cache.yaml", kwargs)
    cmd = shlex.join(python(*CACHE_CMD, cfg))
    script = f"""
{cmd} 2> {out}.err1; echo $? > {out}.rc1
ls -a $MNT/cache > {out}.ls1
mount -o remount,size=64m $MNT
{cmd} 2> {out}.err2; echo $? > {out}.rc2
cp -a $MNT/cache {out}
"""
    r = in_tmpfs(script, mnt, f"{size_kb}k")
    if r.returncode == 99:
        raise RuntimeError("could not mount a tmpfs")
    rc1, rc2 = int(Path(f"{out}.rc1").read_text()), int(Path(f"{out}.rc2").read_text())
    err1 = last_line(Path(f"{out}.err1").read_text())
    listing = Path(f"{out}.ls1").read_text().split()
    temps = [n for n in listing if ".tmp" in n]
    identical = rc2 == 0 and out.exists() and cache_files(out) == reference
    one_line = rc1 == 0 or (err1.startswith("error:") and "No space left" in err1
                            and "Traceback" not in Path(f"{out}.err1").read_text())
    record = {"size_kb": size_kb, "first_rc": rc1, "first_error": err1, "temps_left": temps, "resumed_rc": rc2,
              "identical": identical, "one_line_error": one_line}
    record["outcome"] = "identical" if identical and not temps and one_line else "DIFFERENT"
    record["lost"] = "none" if identical else "?"
    for p in workdir.glob("out*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return record


def disk_full_train_trial(workdir, cache_kwargs, reference: dict, size_kb: int, max_steps: int = 40) -> dict:
    """Train with the run folder on a tmpfs of `size_kb` (a checkpoint every step, all kept, no
    logger), grow the disk, resume from last.ckpt, compare the export with the reference."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mnt, out = workdir / "mnt", workdir / "out"
    config = write_fit_config(workdir / "fit_tmpfs.yaml", cache_kwargs, mnt / "run", max_steps=max_steps, every=1,
                              logger=False, save_top_k=-1)
    fit = shlex.join(python("main.py", "fit", "--config", config))
    check = shlex.join(python("-c", "import sys, torch; [torch.load(p, weights_only=True) for p in sys.argv[1:]]"))
    script = f"""
{fit} > /dev/null 2> {out}.err1; echo $? > {out}.rc1
ls -a $MNT/run/checkpoints > {out}.ls1 2>/dev/null
{check} $MNT/run/checkpoints/*.ckpt 2> {out}.load; echo $? > {out}.loadrc
mount -o remount,size=64m $MNT
if [ -f $MNT/run/checkpoints/last.ckpt ]; then RESUME="--ckpt_path $MNT/run/checkpoints/last.ckpt"; else RESUME=""; fi
{fit} $RESUME > /dev/null 2> {out}.err2; echo $? > {out}.rc2
mkdir -p {out} && cp -a $MNT/run/sae {out}/ 2>/dev/null
"""
    r = in_tmpfs(script, mnt, f"{size_kb}k")
    if r.returncode == 99:
        raise RuntimeError("could not mount a tmpfs")
    rc1, rc2 = int(Path(f"{out}.rc1").read_text()), int(Path(f"{out}.rc2").read_text())
    err1 = last_line(Path(f"{out}.err1").read_text())
    listing = Path(f"{out}.ls1").read_text().split() if Path(f"{out}.ls1").exists() else []
    temps = [n for n in listing if ".tmp" in n]
    loadable = Path(f"{out}.loadrc").read_text().strip() == "0" or not [n for n in listing if n.endswith(".ckpt")]
    got = {p.name: p.read_bytes() for p in sorted((out / "sae").iterdir())} if (out / "sae").exists() else {}
    identical = rc2 == 0 and got == reference
    record = {"size_kb": size_kb, "first_rc": rc1, "first_error": err1, "checkpoints": len(listing) - 2,
              "temps_left": temps, "all_checkpoints_load": loadable, "resumed_rc": rc2, "identical": identical,
              "err2": last_line(Path(f"{out}.err2").read_text()) if rc2 else ""}
    record["outcome"] = "identical" if identical and loadable and not temps else "DIFFERENT"
    record["lost"] = "none" if identical else "?"
    for p in workdir.glob("out*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return record


# --- two builders ----------------------------------------------------------------------------------------


def concurrent_builders_trial(workdir, cache_kwargs, reference: dict, builders: int = 2) -> dict:
    """`builders` processes build one cache folder at once: one computes, the others wait on
    the lock and find it complete; the cache equals the reference."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(cache_kwargs, cache_dir=str(workdir / "shared"))
    cfg = write_cache_config(workdir / "shared.yaml", kwargs)
    procs = [subprocess.Popen(python("-m", "sae_lit.data.cache", "--quiet", "--config", cfg), cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(builders)]
    outs = [p.communicate() for p in procs]
    rcs = [p.returncode for p in procs]
    computed = sum("tokens/s" in out for out, _ in outs)
    found_done = sum("(already complete)" in out for out, _ in outs)
    waited = sum("waiting for it to finish" in err for _, err in outs)
    identical = all(rc == 0 for rc in rcs) and cache_files(kwargs["cache_dir"]) == reference
    record = {"builders": builders, "rcs": rcs, "computed": computed, "found_complete": found_done, "waited": waited,
              "identical": identical}
    record["outcome"] = "identical" if identical and computed == 1 and found_done == builders - 1 else "DIFFERENT"
    record["lost"] = "none" if identical else "?"
    shutil.rmtree(kwargs["cache_dir"], ignore_errors=True)
    return record
