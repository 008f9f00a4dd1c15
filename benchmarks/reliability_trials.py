"""Fault-injection trials, many times over, and the table in docs/reliability.md.

    python benchmarks/reliability_trials.py                    # ~30-40 min on 2 shared cores
    python benchmarks/reliability_trials.py --kill_trials 3 --flips 40 --out /tmp/reliability.md   # a quick look

Every trial injects one fault into a small real cache (a tiny llama built from a config, as in
tests/conftest.py) or a run on it, then checks what the user gets: the same bytes as without the
fault, a clear error naming the damaged file or the bad value, or data left out and counted.
A result that differs from the fault-free one without a word is "silently wrong"; the table
must show none. The same trials run as tests in tests/reliability/ (a few each).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]  # this checkout, its test helpers
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import faults  # noqa: E402
import trials  # noqa: E402
from conftest import build_tiny_model, build_tiny_tokenizer, make_texts, sae_module, tiny_cache_kwargs  # noqa: E402
from sae_lit.data import cache as cache_mod  # noqa: E402
from sae_lit.data import shards as sh  # noqa: E402
from sae_lit.data.cache import CacheConfig, build_cache  # noqa: E402
from sae_lit.data.integrity import verify_cache  # noqa: E402


@dataclasses.dataclass
class Row:
    fault: str
    outcome: str  # what every trial must end in
    lost: str  # data lost when it does
    results: list = dataclasses.field(default_factory=list)  # per trial: ("ok" | "silently wrong" | "failed", note)
    detail: str = ""  # where the faults landed, for the notes under the table

    def add(self, kind: str, note: str = "") -> None:
        self.results.append((kind, note))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- setup ----------------------------------------------------------------------------------------


def tiny_world(root: Path) -> dict:
    """The tiny subject model and corpus of tests/conftest.py, and two cache configs: the small
    one of the unit tests (7 shards) and a larger one (56 shards) for the process trials."""
    model_dir, corpus = root / "model", root / "docs.jsonl"
    tokenizer = build_tiny_tokenizer(make_texts(200, seed=1))
    tokenizer.save_pretrained(model_dir)
    build_tiny_model(len(tokenizer)).save_pretrained(model_dir)
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(make_texts(120, seed=2))))
    small = tiny_cache_kwargs(root / "small", str(model_dir), str(corpus))
    large = dict(tiny_cache_kwargs(root / "large", str(model_dir), str(corpus)), train_tokens=16 * 400, val_tokens=16 * 48)
    return {"model": str(model_dir), "corpus": str(corpus), "small": small, "large": large}


# --- process trials: kill -9, a full disk, two builders ---------------------------------------------------


def _kind(r: dict) -> str:
    """A kill trial: ok (interrupted, resumed to identical bytes), failed (the resumed command
    failed, or the kill came too late to interrupt anything), silently wrong (it finished but
    differs)."""
    if r["outcome"] == "identical" and r["interrupted"]:
        return "ok"
    return "failed" if r["resumed_rc"] or not r["interrupted"] else "silently wrong"


def kill_caching(world, root, n, rng) -> Row:
    row = Row("kill -9 while caching (model loading, at a shard boundary, inside a shard write, during the final "
              "statistics, or at a random moment), then the same command again",
              "resumed; every file (shards, sample.npy, manifest.json) byte-identical to an uninterrupted build",
              "none (the shard being written is redone)")
    files, seconds = trials.cache_reference(root, world["large"])
    n_shards = len([f for f in files if f.endswith(".tar")])
    points = ["start", "shards:1", "temp:2", f"temp:{n_shards // 2}", "finalize", f"shards:{n_shards - 3}"]
    points += [f"temp:{rng.randrange(n_shards)}" if i % 2 else "random" for i in range(max(0, n - len(points)))]
    for i, when in enumerate(points[:n]):
        for attempt in range(4):  # a random moment after the process ended is no trial: draw again
            r = trials.cache_kill_trial(root, world["large"], files, when, seconds, seed=100 * attempt + i)
            if r["interrupted"]:
                break
        row.add(_kind(r), json.dumps(r))
        _log(f"kill caching {when}: {r['outcome']} ({r['shards_at_kill']} shards, {r['temps_at_kill']} temp at kill)")
    records = [json.loads(n) for _, n in row.results]
    row.detail = (f"kill -9 while caching: moments {', '.join(r['when'] for r in records)}; shards complete on disk at "
                  f"the kill (of {n_shards}): {', '.join(str(r['shards_at_kill']) for r in records)}; a shard half "
                  f"written at the kill in {sum(r['temps_at_kill'] > 0 for r in records)} trials.")
    return row


def kill_training(world, root, n, rng) -> Row:
    row = Row("kill -9 while training (after checkpoint K, or at a random moment: mid-step, mid-checkpoint, "
              "validation, export), then `--ckpt_path .../last.ckpt`",
              "resumed; exported sae_weights.safetensors and cfg.json byte-identical to an uninterrupted run; "
              "every checkpoint on disk loadable", "none (steps after the last checkpoint are redone)")
    cache = dict(world["large"], cache_dir=str(root / "reference"))
    files, seconds, config = trials.train_reference(root / "train", cache, max_steps=40)
    points = ["step:1", "step:20", "step:39"] + [f"step:{rng.randint(2, 38)}" if i % 3 else "random" for i in range(n)]
    for i, when in enumerate(points[:n]):
        for attempt in range(4):
            r = trials.train_kill_trial(root / "train", config, files, when, seconds, seed=100 * attempt + i)
            if r["interrupted"]:
                break
        row.add(_kind(r), json.dumps(r))
        _log(f"kill training {when}: {r['outcome']} (step {r['step_at_kill']} on disk at kill)")
    records = [json.loads(n) for _, n in row.results]
    row.detail = (f"kill -9 while training (40 steps, a checkpoint every step): moments "
                  f"{', '.join(r['when'] for r in records)}; last checkpointed step at the kill: "
                  f"{', '.join(str(r['step_at_kill']) for r in records)}.")
    return row, files


def disk_full(world, root, n, train_reference, tmpfs: bool) -> list[Row]:
    cache = dict(world["large"], cache_dir=str(root / "reference"))
    ref = faults.cache_files(cache["cache_dir"])
    size = sum(len(v) for v in ref.values()) // 1024
    rows = [Row("disk full while caching (a tmpfs of random size, smaller than the cache), then more space and "
                "the same command again",
                "one-line error `No space left ... resumes at the first missing shard`; no partial file under a "
                "final name or temporary left; resumed byte-identical", "none"),
            Row("disk full while training (run folder on a small tmpfs; a checkpoint every step), then more space "
                "and `--ckpt_path last.ckpt`",
                "one-line error `No space left while saving checkpoint ...; the checkpoints already there are intact`;"
                " every checkpoint on disk loads; resumed export byte-identical", "none")]
    if not tmpfs:
        for row in rows:
            row.fault += " [no tmpfs on this machine: not run; tests/reliability simulate ENOSPC instead]"
        return rows
    rng = random.Random(1)
    for i in range(n):
        kb = rng.randint(100, size - 20)
        r = trials.disk_full_cache_trial(root / f"dc{i}", cache, ref, kb)
        ok = r["outcome"] == "identical" and r["first_rc"] == 1
        rows[0].add("ok" if ok else ("failed" if r["resumed_rc"] or r["first_rc"] else "silently wrong"), json.dumps(r))
        _log(f"disk full caching {kb} KB: {r['outcome']}: {r['first_error'][:100]}")
    for i in range(n):
        kb = rng.randint(150, 900)
        r = trials.disk_full_train_trial(root / f"dt{i}", cache, train_reference, kb, max_steps=40)
        ok = r["outcome"] == "identical" and (r["first_rc"] == 1 or r["first_rc"] == 0)
        rows[1].add("ok" if ok else ("failed" if r["resumed_rc"] else "silently wrong"), json.dumps(r))
        _log(f"disk full training {kb} KB: {r['outcome']} (first run rc {r['first_rc']}, {r['checkpoints']} checkpoints)")
    return rows


def concurrent(world, root, n) -> Row:
    row = Row("two builders started at once on one cache folder",
              "one computes every shard, the other waits on the lock and finds the cache complete; byte-identical",
              "none (no work duplicated)")
    cache = dict(world["large"], cache_dir=str(root / "reference"))
    ref = faults.cache_files(cache["cache_dir"])
    for i in range(n):
        r = trials.concurrent_builders_trial(root / f"cb{i}", cache, ref)
        row.add("ok" if r["outcome"] == "identical" else "failed", json.dumps(r))
        _log(f"two builders: {r['outcome']} (computed {r['computed']}, found complete {r['found_complete']})")
    return row


# --- in-process trials: damaged bytes -----------------------------------------------------------------------


def _contents(cache_dir) -> dict:
    """Everything a reader gets from a cache: per shard, every block's arrays and metadata."""
    m = sh.read_manifest(cache_dir)
    out = {}
    for split in m["splits"].values():
        for s in split["shards"]:
            out[s["file"]] = [(b.key, b.acts.tobytes(), b.tokens.tobytes(), b.meta) for b in sh.iter_shard(
                str(Path(cache_dir) / s["file"]), s["blocks"], first_block=s["first_block"],
                config=m["config_fingerprint"])]
    out["sample"] = (Path(cache_dir) / "sample.npy").read_bytes()
    return out


def _judge(cache_dir, original: dict, damaged: str) -> tuple[str, str]:
    """After damaging file `damaged`: detected (verify names it, or the manifest is refused),
    harmless (everything read is unchanged: padding bytes), or silently wrong."""
    try:
        _, problems = verify_cache(cache_dir)
    except sh.CacheError as e:
        return ("ok", "detected: " + str(e)[:80]) if damaged == "manifest.json" else ("failed", str(e)[:120])
    if problems:
        named = any(f == damaged for f, _ in problems)
        return ("ok" if named else "failed", f"detected: {problems[0][1][:80]}")
    try:
        same = _contents(cache_dir) == original
    except Exception as e:  # noqa: BLE001 - verify passed but reading failed: a finding
        return "failed", f"verify passed but reading raised {type(e).__name__}"
    return ("ok", "harmless: only padding changed") if same else ("silently wrong", "data differs, nothing said")


def damage(world, root, flips: int, payload_flips: int, cuts: int, rng) -> list[Row]:
    cache = dict(world["small"], cache_dir=str(root / "small"))
    build_cache(CacheConfig(**cache), progress=False)
    original = _contents(cache["cache_dir"])
    files = sorted(p.name for p in Path(cache["cache_dir"]).iterdir() if p.is_file() and p.name != ".lock")
    rows = [
        Row("one bit flipped anywhere in the cache (random file among shards, sample.npy and manifest.json; random "
            "byte and bit)", "detected and the file named (tar header checksum, block CRC32, manifest or sample "
            "checksum), or harmless (a padding byte no reader uses)", "none silently; a damaged shard can be "
            "skipped (skip_corrupt_shards, counted) or deleted and rebuilt to the same bytes"),
        Row("one bit flipped inside an .npy payload (array bytes; every header intact) - the issue's case",
            "CorruptShardError naming the shard (block CRC32)", "none silently (as above)"),
        Row("a shard truncated at a random byte", "CorruptShardError naming the shard, or harmless (only "
            "end-of-archive padding cut)", "none silently (as above)"),
    ]
    for i in range(flips):
        name = rng.choice(files)
        path = Path(cache["cache_dir"]) / name
        data = path.read_bytes()
        faults.flip_byte(path, rng.randrange(len(data)), 1 << rng.randrange(8))
        rows[0].add(*_judge(cache["cache_dir"], original, name))
        path.write_bytes(data)
    shards = [f for f in files if f.endswith(".tar")]
    for i in range(payload_flips):
        name = rng.choice(shards)
        path = Path(cache["cache_dir"]) / name
        data = path.read_bytes()
        suffix = rng.choice(["acts.npy", "tokens.npy"])
        start, end = faults.npy_payload_span(path, suffix, block=rng.randrange(4))
        faults.flip_byte(path, rng.randrange(start, end), 1 << rng.randrange(8))
        kind, note = _judge(cache["cache_dir"], original, name)
        rows[1].add(kind if kind != "ok" or note.startswith("detected") else "failed", note)
        path.write_bytes(data)
    for i in range(cuts):
        name = rng.choice(shards)
        path = Path(cache["cache_dir"]) / name
        data = path.read_bytes()
        faults.truncate(path, rng.randrange(len(data)))
        rows[2].add(*_judge(cache["cache_dir"], original, name))
        path.write_bytes(data)
    _log("damage trials: " + "; ".join(f"{Counter(k for k, _ in r.results)}" for r in rows))
    return rows, cache


def hostile_members(cache, root) -> Row:
    row = Row("a tar member with a hostile name (`../../evil.acts.npy`, an absolute path, NUL, not our naming), "
              "first or last in a shard", "CorruptShardError naming the shard (was a bare IndexError); skipped and "
              "counted with skip_corrupt_shards; nothing written anywhere", "that shard's blocks, if skipped (counted)")
    from conftest import make_datamodule

    for name, first in itertools.product(faults.HOSTILE_NAMES, (True, False)):
        work = root / "hostile"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(cache["cache_dir"], work)
        shard = work / "train-000002.tar"
        faults.with_hostile_member(shard, name, first)
        kw = dict(cache, cache_dir=str(work))
        try:
            dm = make_datamodule(kw, batch_size=32, shuffle_buffer=64, progress=False)
            dm.setup()
            list(itertools.islice(dm.train_dataloader(), 60))
            row.add("silently wrong", f"{name!r} read without a word")
            continue
        except sh.CorruptShardError as e:
            named = "train-000002.tar" in str(e)
        dm = make_datamodule(kw, batch_size=32, shuffle_buffer=64, progress=False, skip_corrupt_shards=True)
        dm.setup()
        got = len(list(itertools.islice(dm.train_dataloader(), 60)))
        ok = named and got == 60 and dm.skipped_shards == 1 and not list(root.rglob("evil*"))
        row.add("ok" if ok else "failed", f"{name!r} first={first}")
    return row


# --- in-process trials: provenance, non-finite values, validation, resume, CLI ----------------------------------


def provenance(world, root) -> Row:
    row = Row("manifest.json lost, then a build for another config (another hookpoint, dtype, context length) in "
              "the same folder - the issue's case; or for the same config; or a format-1 cache",
              "another config: refused, naming a shard and what to do (was: \"already complete\" and a manifest "
              "labelling layer-1 shards as another layer); same config: manifest rebuilt byte-identical from the "
              "checked shards; format 1: refused with \"delete and rebuild\"", "none")
    base = dict(world["small"], cache_dir=str(root / "small"))
    for change in ({"hookpoint": "resid_post.0"}, {"hookpoint": "resid_post.3"}, {"dtype": "bfloat16"},
                   {"context_length": 32}, {}):
        work = root / "prov"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base["cache_dir"], work)
        before = faults.cache_files(work)
        (work / "manifest.json").unlink()
        try:
            build_cache(CacheConfig(**dict(base, cache_dir=str(work), **change)), progress=False)
            ok = not change and faults.cache_files(work) == before
            row.add("ok" if ok else "silently wrong", f"{change}: built")
        except sh.ManifestMismatchError as e:
            row.add("ok" if change and "train-000000.tar" in str(e) else "failed", f"{change}: refused")
    m = json.loads((Path(base["cache_dir"]) / "manifest.json").read_text())
    work = root / "prov"
    (work / "manifest.json").write_text(json.dumps({**{k: v for k, v in m.items() if k != "crc32"}, "format_version": 1}))
    try:
        build_cache(CacheConfig(**dict(base, cache_dir=str(work))), progress=False)
        row.add("silently wrong", "format 1 accepted")
    except sh.ManifestMismatchError as e:
        row.add("ok" if "format version 1" in str(e) and "Delete" in str(e) else "failed", "format 1")
    return row


def nonfinite(world, root, n, rng) -> list[Row]:
    from conftest import make_datamodule

    rows = [Row("NaN / +Inf / -Inf activations from the subject model (random tokens, 1-20%), outlier exclusion on "
                "or off - the issue's case", "counted when cached (manifest nonfinite_tokens = the true count); the "
                "data module refuses, naming the shards (was: trained to NaN and exported NaN, or dropped without a "
                "word)", "none"),
            Row("the same with drop_nonfinite=True", "a warning with the count; every batch finite; validation "
                "scores exactly the finite rows; the run trains and exports finite weights", "exactly the "
                "non-finite tokens (counted)")]
    real = cache_mod.HookedForward.__call__
    for i in range(n):
        rate, mod = rng.uniform(0.01, 0.2), rng.randint(5, 40)
        kinds = [float("nan"), float("inf"), -float("inf")]

        def poisoned(self, ids, rate=rate, mod=mod):
            out = real(self, ids).clone()
            g = torch.Generator().manual_seed(int(ids.sum()) + mod)
            hit = torch.rand(ids.shape, generator=g) < rate
            out[..., mod % out.shape[-1]][hit] = kinds[mod % 3]
            return out

        kw = dict(world["small"], cache_dir=str(root / f"nan{i}"))
        cache_mod.HookedForward.__call__ = poisoned
        try:
            m = build_cache(CacheConfig(**kw), progress=False).manifest
        finally:
            cache_mod.HookedForward.__call__ = real
        true = sum(int((~sh.finite_rows(b.acts, m["dtype"])).sum()) for s in itertools.chain(*(
            sp["shards"] for sp in m["splits"].values())) for b in sh.iter_shard(f"{kw['cache_dir']}/{s['file']}"))
        counted = sum(m["nonfinite_tokens"].values()) == true and true > 0
        for exclude_outliers in (True, False):
            try:
                make_datamodule(kw, progress=False, exclude_outliers=exclude_outliers).setup()
                rows[0].add("silently wrong", "accepted")
            except sh.CacheError as e:
                rows[0].add("ok" if counted and ".tar" in str(e) else "failed", f"rate {rate:.2f}")
        dm = make_datamodule(kw, progress=False, drop_nonfinite=True, batch_size=32, shuffle_buffer=64,
                             exclude_outliers=bool(i % 2))
        dm.setup()
        train = torch.cat(list(itertools.islice(dm.train_dataloader(), 30)))
        val = list(dm.val_dataloader())
        expected = sum(len(dm._row_filter()(b.acts)) for s in dm._shards("val") for b in s.read())
        fine = bool(torch.isfinite(train).all()) and all(torch.isfinite(b).all() for b in val)
        exact = sum(len(b) for b in val) == expected and len(val) == len(dm.val_dataloader())
        import lightning as L

        model = sae_module(d_in=dm.d_in, num_latents=32, k=4, dead_tokens=256, lr=2e-3, warmup_steps=2)
        trainer = L.Trainer(accelerator="cpu", max_steps=6, val_check_interval=6, check_val_every_n_epoch=None,
                            default_root_dir=root / f"nanrun{i}", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(model, dm)
        exported = Path(trainer.default_root_dir) / "sae" / "sae_weights.safetensors"
        trained = exported.exists() and all(torch.isfinite(p).all() for p in model.parameters())
        rows[1].add("ok" if fine and exact and trained else "failed", f"rate {rate:.2f}")
    _log(f"non-finite: {[Counter(k for k, _ in r.results) for r in rows]}")
    return rows


def training_faults(world, root, n, rng) -> list[Row]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sae_lit.data.synthetic import SyntheticActivationDataModule
    from sae_lit.model.formats import export_sae
    from sae_lit.model.sae import TopKSAE
    from sae_lit.training.checkpoint import AtomicCheckpointIO

    rows = [Row("a NaN in one training batch at a random step", "stops at that step with `train/loss is nan at "
                "step K` before the weights change (was: trained to NaN, exit 0); no NaN in any checkpoint; no "
                "export", "none (last checkpoint intact)"),
            Row("export of an SAE with a NaN / Inf weight", "refused, naming the tensors; nothing written",
                "none")]

    class Poisoned(SyntheticActivationDataModule):
        def __init__(self, at):
            super().__init__(d_in=16, num_features=64, batch_size=128)
            self.at = at

        def train_dataloader(self):
            def batches():
                for j, x in enumerate(super(Poisoned, self).train_dataloader()):
                    yield x.index_fill(0, torch.tensor([3]), float("nan")) if j == self.at else x
            return batches()

    for i in range(n):
        at = rng.randint(1, 12)
        run_root = root / f"nanloss{i}"
        model = sae_module(d_in=16, num_latents=64, k=4, dead_tokens=4096, lr=2e-3, warmup_steps=2,
                           histogram_every_n_steps=0)
        trainer = L.Trainer(accelerator="cpu", max_steps=15, val_check_interval=15, check_val_every_n_epoch=None,
                            default_root_dir=run_root, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
                            callbacks=[ModelCheckpoint(dirpath=run_root / "ckpt", every_n_train_steps=1, save_top_k=-1)])
        try:
            trainer.fit(model, Poisoned(at))
            rows[0].add("silently wrong", "finished")
        except FloatingPointError as e:
            finite = all(torch.isfinite(p).all() for p in model.parameters()) and all(
                torch.isfinite(torch.load(c, weights_only=True)["state_dict"]["sae.W_enc"]).all()
                for c in (run_root / "ckpt").glob("*.ckpt"))
            rows[0].add("ok" if finite and f"step {at}" in str(e) and not (run_root / "sae").exists() else "failed",
                        f"NaN at step {at}")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        sae = TopKSAE(16, 32, k=4, normalize="none")
        with torch.no_grad():
            getattr(sae, name).view(-1)[rng.randrange(getattr(sae, name).numel())] = rng.choice([float("nan"), float("inf")])
        try:
            export_sae(sae, root / f"export_{name}")
            rows[1].add("silently wrong", name)
        except ValueError as e:
            rows[1].add("ok" if name in str(e) and not (root / f"export_{name}").exists() else "failed", name)
    return rows


def resume_and_cli(world, root) -> list[Row]:
    from sae_lit.training.checkpoint import AtomicCheckpointIO
    from sae_lit.training.cli import cli_main, main
    from sae_lit.training.export import main as export_main
    from sae_lit.training.resume import ResumeMismatchError

    rows = [Row("resume with model arguments other than the checkpoint's (num_latents, k, activation, ema_decay, "
                "k_aux) - the issue's case", "refused before anything runs, naming each key, both values and what "
                "to do (was: silently trained and exported the checkpoint's 64 latents)", "none"),
            Row("resume with a changed lr or schedule (warmup_steps, dead_tokens)", "allowed, said "
                "(`Resuming with changed lr: ...`) and applied to the restored optimizer and scheduler", "none"),
            Row("a user's mistake on the command line (bad value, wrong type, unknown key, missing path, unknown "
                "hookpoint or model, a cache built for another config)", "one line `error: <key>: <what>` and "
                "exit status 1 or 2; no traceback, no parser dump; `--debug` shows the traceback", "none"),
            Row("a pickle payload in a checkpoint (export command, resume)", "refused by torch.load(weights_only="
                "True), passed explicitly; the payload never runs", "none")]
    cache = dict(world["small"], cache_dir=str(root / "small"))
    config = faults.write_fit_config(root / "fit.yaml", cache, root / "logs", max_steps=8, every=4)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(["fit", "--config", str(config)])
    last = next((root / "logs").rglob("last.ckpt"))
    base = ["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_steps=12"]
    for flags in (["--model.sae.num_latents", "512"], ["--model.sae.k", "8"], ["--model.sae.activation", "relu"],
                  ["--model.ema_decay", "0.999"], ["--model.sae.k_aux", "16"]):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cli_main([*base, f"--trainer.default_root_dir={root / 'r'}", *flags])
            rows[0].add("silently wrong", " ".join(flags))
        except ResumeMismatchError as e:
            rows[0].add("ok" if flags[0][2:] in str(e) and not list((root / "r").rglob("*.ckpt")) else "failed",
                        " ".join(flags))
    for i, flags in enumerate((["--model.lr=0.0005"], ["--model.warmup_steps=5", "--model.dead_tokens=100"])):
        out = root / f"safe{i}"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            cli_main([*base, f"--trainer.default_root_dir={out}", *flags])
        ck = torch.load(next(out.rglob("last.ckpt")), weights_only=True)
        key, value = flags[0][len("--model."):].split("=")
        applied = str(ck["hyper_parameters"][key]) == value and ck["global_step"] == 12
        if key == "lr":
            applied &= ck["optimizer_states"][0]["param_groups"][0]["lr"] == float(value)
        rows[1].add("ok" if applied else "silently wrong", " ".join(flags))
    for flags, status, words in faults.MISTAKES:
        tmp = Path(tempfile.mkdtemp(dir=root))
        flags = [f.replace("{tmp}", str(tmp)) for f in flags]
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp}", *flags])
            rows[2].add("silently wrong", " ".join(flags))
        except SystemExit as e:
            line = faults.last_line(err.getvalue())
            clean = "Traceback" not in err.getvalue() and "Namespace(" not in err.getvalue()
            ok = e.code == status and line.startswith("error: ") and all(w in line for w in words) and clean
            rows[2].add("ok" if ok else "failed", " ".join(flags) + " -> " + line)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    bad = root / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload()}))
    for load in (lambda: export_main([str(bad), str(root / "out")]), lambda: AtomicCheckpointIO().load_checkpoint(bad)):
        try:
            load()
            rows[3].add("silently wrong", "loaded")
        except pickle.UnpicklingError:
            rows[3].add("ok" if not (root / "pwned").exists() else "failed", "refused")
    return rows


def validation(world, root) -> Row:
    from types import SimpleNamespace

    from conftest import make_datamodule

    row = Row("validation split over 1, 2, 3 or 5 ranks, val_batch_size 7, 32 or 4096 (not dividing the split) - "
              "the issue's case", "every row scored exactly once, the last batch partial, equal batch counts on "
              "every rank; the rows of all ranks together = one process's (was: whole batches only, up to 48% "
              "unscored)", "none")
    cache = dict(world["small"], cache_dir=str(root / "small"))
    for world_size, batch in itertools.product((1, 2, 3, 5), (7, 32, 4096)):
        parts, lens = [], set()
        for rank in range(world_size):
            dm = make_datamodule(cache, progress=False, val_batch_size=batch)
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
            dm.setup()
            batches = list(dm.val_dataloader())
            lens.add((len(batches), len(dm.val_dataloader())))
            parts.append(torch.cat(batches))
        everything = torch.cat([a[1:] for _, a in make_datamodule(cache, progress=False).iter_blocks("val")])
        same = torch.equal(torch.cat(parts), everything)
        row.add("ok" if same and len(lens) == 1 and len(next(iter(lens))) == 2 and len(set(next(iter(lens)))) == 1
                else "silently wrong", f"{world_size} ranks, batch {batch}")
    return row


def leftovers_and_text(world, root) -> list[Row]:
    rows = [Row("temporary files left by killed builds (`.NAME.tmp<PID>`)", "removed when the next build starts "
                "(under the lock); the cache byte-identical", "none"),
            Row("hostile token text (`</script>`, `<img onerror>`, `<svg onload>`, template and path strings) "
                "through the cache into the dashboard", "escaped everywhere; no markup from the text reaches a page",
                "none")]
    cache = dict(world["small"], cache_dir=str(root / "small"))
    work = root / "stale"
    shutil.copytree(cache["cache_dir"], work)
    before = faults.cache_files(work)
    (work / "manifest.json").unlink()
    (work / "train-000001.tar").unlink()
    for name in (".train-000001.tar.tmp4242", ".manifest.json.tmp17", ".sample.npy.tmp3"):
        (work / name).write_bytes(b"partial")
    build_cache(CacheConfig(**dict(cache, cache_dir=str(work))), progress=False)
    rows[0].add("ok" if faults.cache_files(work) == before else "failed")

    from sae_lit.dashboard.__main__ import main as dashboard
    from sae_lit.model.formats import export_sae
    from sae_lit.model.sae import TopKSAE

    hostile = ['</script><script>alert(1)</script>', '<img src=x onerror="alert(2)">', '"><svg onload=alert(3)>',
               "{{7*7}} ${7*7} ../../etc/passwd", "<!-- --><b>&amp;</b>"]
    corpus = root / "hostile.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"h{i}", "text": " ".join(hostile[i % 5:] + hostile[:i % 5]) * 3}) + "\n"
                              for i in range(40)))
    kw = tiny_cache_kwargs(root / "hostile_cache", world["model"], str(corpus))
    m = build_cache(CacheConfig(**kw), progress=False).manifest
    sae = TopKSAE(m["d_in"], 16, k=4, normalize="none", seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    export_sae(sae, root / "hostile_sae")
    with contextlib.redirect_stdout(io.StringIO()):
        dashboard(["--sae", str(root / "hostile_sae"), "--cache", kw["cache_dir"], "--out", str(root / "site"),
                   "--progress", "false", "--precision", "float32", "--top_n", "4"])
    texts = [p.read_text() for p in (root / "site").rglob("*.html")]
    safe = all("<img" not in t and "<svg onload" not in t and "<script>alert" not in t and "<b>&amp;</b>" not in t
               for t in texts) and "&lt;" in "".join(texts)
    rows[1].add("ok" if safe else "silently wrong", f"{len(texts)} pages")
    return rows


# --- the table ------------------------------------------------------------------------------------------------


def render(rows: list[Row], args, tmpfs: bool, seconds: float) -> str:
    total = sum(len(r.results) for r in rows)
    wrong = sum(k == "silently wrong" for r in rows for k, _ in r.results)
    failed = sum(k == "failed" for r in rows for k, _ in r.results)
    lines = [
        "# Reliability: fault-injection trials",
        "",
        "Generated by `python benchmarks/reliability_trials.py` (the command below); do not edit by hand.",
        "Each trial injects one fault into a small real activation cache (the tiny llama and corpus of",
        "`tests/conftest.py`; 7 shards for the in-process trials, 56 for the process trials) or a training",
        "run on it, and checks what a user gets. \"Silently wrong\" means a result that differs from the",
        "fault-free one while nothing was said; the same trials run as tests in `tests/reliability/`.",
        "",
        f"**{total} trials: {total - wrong - failed} as described, {wrong} silently wrong, {failed} otherwise failed.**",
        "",
        "| fault | trials | outcome | data lost |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        counts = Counter(k for k, _ in r.results)
        notes = Counter(n.split(":")[0] for k, n in r.results if n.startswith(("detected", "harmless")))
        tally = f"{counts['ok']}/{len(r.results)} as described"
        if notes:
            tally += " (" + ", ".join(f"{v} {k}" for k, v in sorted(notes.items())) + ")"
        if counts["silently wrong"]:
            tally += f"; **{counts['silently wrong']} silently wrong**"
        if counts["failed"]:
            tally += f"; **{counts['failed']} failed**"
        lines.append(f"| {r.fault} | {len(r.results)} | {r.outcome}: {tally} | {r.lost} |")
    lines += [
        "",
        "## How the faults are made",
        "",
        "- kill -9: `SIGKILL` to `python -m sae_lit.data.cache` / `python main.py fit` at the moment named",
        "  (polled from the files the process writes), then the same command again (`--ckpt_path` to the",
        "  run's `last.ckpt` for training). All processes run with `OMP_NUM_THREADS=1`, as do the",
        "  uninterrupted references the results are compared with byte for byte.",
        "- Disk full: " + ("a real tmpfs in a private user + mount namespace (`unshare -rm`), sized below what the "
                           "step needs, then grown with `mount -o remount`." if tmpfs else
                           "not run here (no tmpfs could be mounted); `tests/reliability` simulate ENOSPC."),
        "- Damaged bytes: `flip_byte` / `truncate` in `tests/reliability/faults.py`; after each fault",
        "  `python -m sae_lit.data.cache --verify` (its function) must name the file, or every block read",
        "  back must equal the original.",
        "- Concurrent builders: two processes started together on one empty folder.",
        "",
        *[f"- {r.detail}" for r in rows if r.detail],
        "",
        "## Commands",
        "",
        "```bash",
        "python benchmarks/reliability_trials.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "keep")),
        "python -m pytest tests/reliability -m \"\"        # the same faults as tests (slow ones included)",
        "python -m sae_lit.data.cache --cache_dir DIR --verify   # check a whole cache (exit 1 if damaged)",
        "```",
        "",
        f"Trials took {seconds / 60:.0f} min here (shared CPU; a figure for planning, not a benchmark).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill_trials", type=int, default=10, help="kill -9 trials for caching, and for training")
    ap.add_argument("--disk_trials", type=int, default=5, help="full-disk trials for caching, and for training")
    ap.add_argument("--builder_trials", type=int, default=3)
    ap.add_argument("--flips", type=int, default=300, help="random bit flips anywhere in the cache")
    ap.add_argument("--payload_flips", type=int, default=60)
    ap.add_argument("--cuts", type=int, default=60)
    ap.add_argument("--nonfinite_trials", type=int, default=4)
    ap.add_argument("--nan_loss_trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="sae_lit_reliability_"))
    _log(f"work folder {root}")
    try:
        world = tiny_world(root)
        tmpfs = faults.tmpfs_available()
        rows = []
        rows.append(kill_caching(world, root, args.kill_trials, rng))
        row, train_ref = kill_training(world, root, args.kill_trials, rng)
        rows.append(row)
        rows += disk_full(world, root, args.disk_trials, train_ref, tmpfs)
        rows.append(concurrent(world, root, args.builder_trials))
        damaged, small = damage(world, root, args.flips, args.payload_flips, args.cuts, rng)
        rows += damaged
        rows.append(hostile_members(small, root))
        rows.append(provenance(world, root))
        rows += nonfinite(world, root, args.nonfinite_trials, rng)
        rows += training_faults(world, root, args.nan_loss_trials, rng)
        rows.append(validation(world, root))
        rows += resume_and_cli(world, root)
        rows += leftovers_and_text(world, root)
        text = render(rows, args, tmpfs, time.monotonic() - start)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        (root / "records.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        print(text)
        bad = [(r.fault[:60], n) for r in rows for k, n in r.results if k != "ok"]
        for fault, note in bad:
            print(f"NOT AS DESCRIBED: {fault}: {note[:300]}")
        _log(f"wrote {args.out}" + (f"; records in {root / 'records.json'}" if args.keep else ""))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
