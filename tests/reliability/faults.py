"""Fault injection on a small real cache: byte flips, truncation, hostile tar members, kill -9 of
a subprocess at a chosen moment, a full disk (a small tmpfs in a private mount namespace where
the machine allows one). Used by tests/reliability/ and benchmarks/reliability_trials.py."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Member names a hostile (or broken) shard might carry; none may be read as a block, and none
# may make anything be written anywhere (shards are only ever read in memory).
HOSTILE_NAMES = (
    "../../evil.acts.npy",
    "/etc/evil.acts.npy",
    "train-000000000.acts.npy/../../../evil",
    "train-00000000x.acts.npy",
    "evil",
    "train-000000000.acts.npy\x00.txt",
)

# A user's mistakes on `python main.py fit --config <tiny config>`: (flags, exit status, words
# the one error line must hold). "{tmp}": a fresh folder.
MISTAKES = [
    (["--data.init_args.batch_size", "abc"], 2, ["data.init_args.batch_size", "expected int", "'abc'"]),
    (["--data.init_args.batch_size", "0"], 1, ["batch_size", "positive integer", "got 0"]),
    (["--data.init_args.val_batch_size", "-3"], 1, ["val_batch_size", "got -3"]),
    (["--model.sae.num_latnts", "3"], 2, ["unrecognized arguments", "num_latnts"]),
    (["--model.lr_decay", "fast"], 2, ["model.lr_decay", "'none', 'linear', 'cosine'", "'fast'"]),
    (["--model.sae.k", "many"], 2, ["model.sae.k", "expected int", "'many'"]),
    (["--data", "nowhere.DataModule"], 2, ["data", "nowhere.DataModule", "No module named"]),
    (["--data.init_args.cache.dtype", "float8"], 1, ["cache.dtype", "float16", "'float8'"]),
    (["--data.init_args.cache.context_length", "1"], 1, ["cache.context_length", "at least 2", "got 1"]),
    (["--data.init_args.cache.val_fraction", "1.5"], 1, ["cache.val_fraction", "1.5"]),
    (["--data.init_args.cache.train_tokens", "2.5"], 2, ["data.init_args.cache.train_tokens", "expected int"]),
    (["--data.init_args.cache.hookpoint", "resid_post.99", "--data.init_args.cache.cache_dir", "{tmp}/c"], 1,
     ["hookpoint 'resid_post.99'", "4 blocks"]),
    (["--data.init_args.cache.hookpoint", "model.layers.1.nope", "--data.init_args.cache.cache_dir", "{tmp}/c"], 1,
     ["hookpoint 'model.layers.1.nope'", "module path"]),
    (["--data.init_args.cache.model", "/no/such/model", "--data.init_args.cache.cache_dir", "{tmp}/c"], 1,
     ["model '/no/such/model' does not exist", "hub id"]),
    (["--data.init_args.cache.corpus", "/no/such.jsonl", "--data.init_args.cache.cache_dir", "{tmp}/c"], 1,
     ["corpus", "/no/such.jsonl", "does not exist"]),
    (["--config", "/no/such.yaml"], 2, ["config", "/no/such.yaml"]),
    (["--ckpt_path", "/no/such.ckpt"], 1, ["ckpt_path", "/no/such.ckpt", "does not exist"]),
    (["--data.init_args.cache.hookpoint", "resid_post.2"], 1, ["hookpoint: cache has 'resid_post.1'", "Delete"]),
]


# --- files -------------------------------------------------------------------------------------


def cache_files(cache_dir) -> dict[str, bytes]:
    """Every file of a cache folder (hidden ones too: a stray temporary file is a difference)."""
    return {p.name: p.read_bytes() for p in sorted(Path(cache_dir).iterdir()) if p.is_file()}


def member_span(shard, suffix: str, block: int = 0) -> tuple[int, int]:
    """(start, end) byte offsets of the data of the block-th member ending in `suffix`."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(suffix)]
    m = members[block]
    return m.offset_data, m.offset_data + m.size


def npy_payload_span(shard, suffix: str = "acts.npy", block: int = 0) -> tuple[int, int]:
    """The array bytes of an .npy member: its header (and the tar header) stay intact."""
    start, end = member_span(shard, suffix, block)
    with open(shard, "rb") as f:
        f.seek(start)
        head = f.read(12)
    major = head[6]
    header_len = int.from_bytes(head[8:10], "little") if major == 1 else int.from_bytes(head[8:12], "little")
    return start + (10 if major == 1 else 12) + header_len, end


def flip_byte(path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def with_hostile_member(path, name: str, first: bool = True) -> None:
    """Rewrite a shard with one extra member called `name` (before or after its blocks)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    evil = tarfile.TarInfo(name)
    evil.size = 4
    extra = [(evil, b"evil")]
    members = extra + members if first else members + extra
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    Path(path).write_bytes(buf.getvalue())


# --- configs -----------------------------------------------------------------------------------


def write_cache_config(path, cache_kwargs: dict) -> Path:
    Path(path).write_text(yaml.safe_dump(dict(cache_kwargs)))
    return Path(path)


def write_fit_config(path, cache_kwargs: dict, root, max_steps: int = 16, every: int = 1, logger: bool = True,
                     save_top_k: int = 1, **data) -> Path:
    """A LightningCLI config: a tiny SAE on the tiny cache, a checkpoint every `every` steps."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "val_check_interval": max(2, max_steps // 2),
            "check_val_every_n_epoch": None, "log_every_n_steps": 2, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root), "logger": logger,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"every_n_train_steps": every, "save_last": True, "save_top_k": save_top_k}}],
        },
        "model": {"sae": {"num_latents": 64, "k": 4}, "dead_tokens": 256, "warmup_steps": 2, "lr": 0.002,
                  "histogram_every_n_steps": 0},
        "data": {"class_path": "sae_lit.data.datamodule.ActivationDataModule",
                 "init_args": {"batch_size": 32, "shuffle_buffer": 64, "progress": False, "cache": dict(cache_kwargs),
                               **data}},
    }
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


# --- processes ---------------------------------------------------------------------------------


def env() -> dict:
    # One thread: the same arithmetic in every process, so resumed runs can match byte for byte.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def run(cmd, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw)


def start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 300, poll: float = 0.002) -> bool:
    """Poll until predicate() is true; False if the process ended (or time ran out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def kill9(proc: subprocess.Popen) -> bool:
    """SIGKILL; True if the process was still running (a real interruption)."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def temp_files(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob(".*.tmp*"))


# --- a full disk -------------------------------------------------------------------------------


def tmpfs_available() -> bool:
    """Whether this machine lets us mount a private tmpfs (a user + mount namespace)."""
    if shutil.which("unshare") is None:
        return False
    probe = Path(f"/tmp/sae_lit_tmpfs_probe_{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe} && df {probe}"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def in_tmpfs(script: str, mountpoint, size: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a shell script with a tmpfs of `size` mounted at `mountpoint`, in a private mount
    namespace (nothing outside sees it; the script copies out what it wants to keep). The
    script may grow the disk with `mount -o remount,size=... $MNT`."""
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    full = f"set -u; MNT={mountpoint}; mount -t tmpfs -o size={size} tmpfs $MNT || exit 99\n{script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", full], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def manifest(cache_dir) -> dict:
    return json.loads((Path(cache_dir) / "manifest.json").read_text())
