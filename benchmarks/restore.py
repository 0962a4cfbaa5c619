"""`instance-agent restore` side by side with the pipelines a user types by hand, on a local SeaweedFS.

    python benchmarks/restore.py --size 1GiB --rounds 3            # everything
    python benchmarks/restore.py --size 1GiB --rounds 3 --no-shipped

The corpus is benchmarks/corpus.py's (the one compare.py backs up). It is backed up once with
`instance-agent backup` (defaults: zstd, no digests) and once with `--hash sha256`; then each
competitor restores the archive into a new directory, rounds interleaved (P5 PA R RV RH …):

- P5 `s5cmd cat s3://…/x.tar.zst | zstd -d | tar -x -C DEST` and PA the same with
  `aws s3 cp … -`: the pipelines to beat (target: R wall ≤ 1.0× the faster, median);
- R `instance-agent restore KEY DEST`;
- RV `restore --verify` of the default archive (sizes and times) and RH `restore --verify`
  of the `--hash sha256` archive (every byte hashed): target ≤ 1.3× R.

Peak RSS (the whole process tree, sampled every 50 ms) is taken at `--small` (100 MiB) and at
`--size`: target ≤ 1.2× from the small archive to the large one.

Unless `--no-shipped`, a shipped backup is made the way an instance makes one: `watch --ship`
(the IMDS stub, moto's Auto Scaling) ships the corpus, its times an hour old, as segments while
a live file grows; then the instance is terminated and the final archive holds the live file.
SL is `restore --latest` of it (and SLV with `--verify`), against S5, the s5cmd pipeline run
over each object in turn (the final archive and every segment) into the same DEST.

Every competitor's tree is checked once against the source, file by file (SHA-256). Between
runs the page cache is synced, outside the timing; the trees are removed at the end (after
each round when the disk lacks room for them all), then `--settle` seconds pass. Results:
benchmarks/results/restore-SIZE.{md,json,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from support.seaweed import SeaweedS3  # noqa: E402

from benchmarks.compare import Sample, pyplot, run_one, stand_in_client, stand_in_env, tools  # noqa: E402
from benchmarks.corpus import generate  # noqa: E402
from instance_agent.configvalues import parse_size  # noqa: E402

WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
BUCKET = "bench"
INSTANCE = "i-0123456789abcdef0"
LIVE = 32 * 2**20
VERIFY_TARGET, RSS_TARGET, WALL_TARGET = 1.3, 1.2, 1.0


@dataclass
class Competitor:
    name: str
    label: str
    command: str  # bash; {key} {dest} {aws} {s5cmd} {py} {endpoint} {keys} filled in
    tree: str  # the source the restored tree must equal: "main" or "shipped"


RESTORE = "{py} -m instance_agent restore --bucket bench --log-level warning {flags} > /dev/null"
COMPETITORS = [
    Competitor(
        "P5",
        "s5cmd cat | zstd -d | tar -x",
        "{s5cmd} --endpoint-url {endpoint} cat s3://bench/{key} | zstd -q -d | tar -x -C {dest}",
        "main",
    ),
    Competitor(
        "PA",
        "aws s3 cp - | zstd -d | tar -x",
        "{aws} s3 cp --quiet s3://bench/{key} - | zstd -q -d | tar -x -C {dest}",
        "main",
    ),
    Competitor("R", "instance-agent restore", RESTORE.replace("{flags}", "s3://bench/{key} {dest}"), "main"),
    Competitor(
        "RV",
        "restore --verify (default manifest: sizes, times)",
        RESTORE.replace("{flags}", "--verify s3://bench/{key} {dest}"),
        "main",
    ),
    Competitor(
        "RH",
        "restore --verify (--hash sha256 manifest)",
        RESTORE.replace("{flags}", "--verify s3://bench/{hkey} {dest}"),
        "main",
    ),
    Competitor(
        "S5",
        "shipped: s5cmd cat | zstd -d | tar -x, each object in turn",
        "for k in {keys}; do {s5cmd} --endpoint-url {endpoint} cat s3://bench/$k | zstd -q -d "
        "| tar -x -C {dest} || exit 1; done",
        "shipped",
    ),
    Competitor(
        "SL",
        "shipped: instance-agent restore --latest",
        RESTORE.replace("{flags}", "--latest --asg-name {group} {dest}"),
        "shipped",
    ),
    Competitor(
        "SLV",
        "shipped: restore --latest --verify",
        RESTORE.replace("{flags}", "--latest --verify --asg-name {group} {dest}"),
        "shipped",
    ),
]


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                out[str(path.relative_to(root))] = h.hexdigest()
    return out


def same_tree(restored: Path, source: Path, expected: dict[str, str]) -> bool:
    """Every file equal to the source's; the live file (still growing while it was archived)
    a prefix of the source's."""
    got = tree_digests(restored)
    live = "app/live.log"
    if live in got:
        kept = (restored / live).read_bytes()
        if not (source / live).read_bytes().startswith(kept) or len(kept) < LIVE:
            return False
        got.pop(live)
        expected = {k: v for k, v in expected.items() if k != live}
    return got == expected


def backup(src: Path, env: dict[str, str], prefix: str, *extra: str) -> tuple[str, int]:
    """Back `src` up once; its archive key and compressed size."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instance_agent",
            "backup",
            "--no-complete",
            "--no-journal",
            "--instance-id",
            INSTANCE,
            "--region",
            "us-east-1",
            "--bucket",
            BUCKET,
            "--source",
            str(src),
            "--key-template",
            prefix + "/{instance_id}/{timestamp}",
            "--json",
            "--log-level",
            "warning",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"backup failed: {proc.stderr}")
    result = json.loads(proc.stdout)
    return str(result["key"]), int(result["bytes_uploaded"])


def shipped_backup(src: Path, tmp: Path, s3_endpoint: str) -> str:
    """A termination backup of `src` made with `watch --ship` (termination_latency's run): its
    group. The live file keeps growing until the backup is done: the restored one is a prefix."""
    from support.faultproxy import FaultProxy

    from benchmarks import termination_latency
    from instance_agent.local.moto_server import MotoServer

    old = time.time() - 3600
    for dirpath, _, names in os.walk(src):
        for f in names:
            os.utime(os.path.join(dirpath, f), (old, old))
    live = src / "app" / "live.log"
    with open(live, "wb") as fh:
        line = b"live line of the application that is still running, padded...\n"
        fh.write(line * (LIVE // len(line)))
    stop = threading.Event()
    appender = threading.Thread(target=termination_latency._append, args=(live, stop), daemon=True)
    args = argparse.Namespace(ship_settle=60.0, ship_bandwidth="256MiB", log_level="warning", keep_logs=None)
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    appender.start()
    try:
        with MotoServer() as moto, FaultProxy(s3_endpoint) as proxy:
            run = termination_latency.one_run("ship", src, tmp, moto, proxy, args, 1)
    finally:
        stop.set()
        appender.join()
        os.environ.clear()
        os.environ.update(saved)
    if run["result"] != "CONTINUE":
        raise SystemExit(f"the shipped backup did not succeed: {run}")
    return "lat-ship-1"


def object_keys(client: Any, group: str) -> list[str]:
    """The final archive of `group` and every segment of its instance, archives only."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{group}/"):
        keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".tar.zst")]
    return sorted(keys)


def in_tmpfs(path: Path) -> bool:
    """Whether `path` is on a tmpfs (the longest mount point above it, from /proc/self/mounts)."""
    best, kind, where = "", "", str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if where.startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, fstype
    return kind == "tmpfs"


def summarise(name: str, got: list[Sample]) -> dict[str, Any]:
    walls, cpus = [x.wall for x in got], [x.cpu for x in got]
    return {
        "name": name,
        "walls": [round(w, 3) for w in walls],
        "cpus": [round(c, 3) for c in cpus],
        "rss_mib": [round(x.rss, 1) for x in got],
        "wall": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu": statistics.median(cpus),
        "cpu_min": min(cpus),
        "cpu_max": max(cpus),
        "rss": max(x.rss for x in got),
    }


def chart(rows: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    names = [f"{r['name']}: {labels[r['name']]}" for r in rows]
    colours = ["#2a7" if r["name"][0] in "RS" and r["name"] != "S5" else "#57a" for r in rows]
    for axis, metric, title in ((ax, "wall", "wall time"), (ax_cpu, "cpu", "CPU-seconds")):
        values = [r[metric] for r in rows]
        spread = [
            [r[metric] - r[f"{metric}_min"] for r in rows],
            [r[f"{metric}_max"] - r[metric] for r in rows],
        ]
        axis.barh(names, values, color=colours, xerr=spread, ecolor="#333", capsize=3)
        axis.set_xlabel(f"{title}, median and min–max (s)")
        for i, (v, r) in enumerate(zip(values, rows, strict=True)):
            axis.text(r[f"{metric}_max"], i, f"  {v:.2f} s", va="center")
        axis.set_xlim(0, max(r[f"{metric}_max"] for r in rows) * 1.3)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--small", default="100MiB", help="the second archive size, for peak RSS")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="competitors, comma-separated, e.g. P5,R")
    ap.add_argument("--no-shipped", action="store_true")
    ap.add_argument("--dest-root", type=Path, default=WORK, help="where the trees are restored")
    ap.add_argument("--settle", type=float, default=35.0, help="seconds to wait after removing trees")
    args = ap.parse_args()
    size, small = parse_size(args.size), parse_size(args.small)
    aws, s5 = tools()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "instance_agent")], check=True)
    src = generate(WORK / f"corpus-{size}", size)
    small_src = generate(WORK / f"corpus-{small}", small)
    chosen = [c for c in COMPETITORS if not args.only or c.name in args.only.split(",")]
    if args.no_shipped:
        chosen = [c for c in chosen if c.tree != "shipped"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp_name,
        SeaweedS3(Path(tmp_name) / "weed") as s3,
    ):
        tmp = Path(tmp_name)

        env = stand_in_env(s3.endpoint)
        client = stand_in_client(s3.endpoint)
        client.create_bucket(Bucket=BUCKET)
        key, up = backup(src, env, "main")
        hkey, _ = backup(src, env, "hashed", "--hash", "sha256")
        skey, _ = backup(small_src, env, "small")
        print(f"backed up {args.size}: {key} ({up:,} bytes)", flush=True)
        group, keys, shipped_src = "", [], src
        if any(c.tree == "shipped" for c in chosen):
            ship_src = WORK / f"corpus-ship-{size}"
            if ship_src.exists():
                shutil.rmtree(ship_src)
            shutil.copytree(src, ship_src)
            group, shipped_src = shipped_backup(ship_src, tmp, s3.endpoint), ship_src
            keys = object_keys(client, group)
            print(f"shipped backup of group {group}: {len(keys)} objects", flush=True)
        expected = {"main": tree_digests(src), "shipped": tree_digests(shipped_src)}
        dests = args.dest_root / "restore-dest"
        shutil.rmtree(dests, ignore_errors=True)
        dests.mkdir(parents=True)
        fields = dict(
            key=key, hkey=hkey, aws=aws, s5cmd=s5, py=sys.executable, endpoint=s3.endpoint,
            keys=" ".join(keys), group=group,
        )  # fmt: skip
        samples: dict[str, list[Sample]] = {c.name: [] for c in chosen}
        correct: dict[str, bool] = {}
        made: list[Path] = []

        def run(c: Competitor, **override: Any) -> tuple[Sample, Path]:
            dest = dests / f"{len(made)}-{c.name}"
            dest.mkdir()
            made.append(dest)
            sample = run_one(c.command.format(**{**fields, "dest": dest, **override}), env)
            # Outside the timing: the next competitor starts with no dirty pages of this one's
            # tree to write back. Without it, the fifth 1 GiB tree of a round met the kernel's
            # dirty limit (vm.dirty_ratio) and paid for the four before it.
            os.sync()
            return sample, dest

        # Room to keep every tree until the end: then no tree is removed while others are
        # timed. Removed after each round, even with --settle, the first restore after a
        # removal was the slow one (P5 13.9 and 15.0 s in rounds 2 and 3, 2.8 s in round 1).
        # Not in tmpfs, where the kept trees are memory (3 rounds of 3 filled the page cache
        # and doubled every third-round time).
        room = (
            not in_tmpfs(dests)
            and shutil.disk_usage(dests).free > 1.2 * size * (len(chosen) + 1) * args.rounds
        )
        print(f"trees kept until the end: {room}", flush=True)

        def clean(last: bool = False) -> None:
            """Remove the trees restored so far (at the end only, when there is room), then
            wait: ext4 passes over every inode freed in the last 30 s when it allocates one
            (fs/ext4/ialloc.c, recently_deleted), so a tree restored right after another was
            removed pays for each of its files again; the wait at the end spares whatever runs
            next."""
            if room and not last:
                return
            for dest in made:
                shutil.rmtree(dest)
            made.clear()
            os.sync()
            time.sleep(args.settle)

        for rnd in range(args.rounds):
            for c in chosen:
                sample, dest = run(c)
                samples[c.name].append(sample)
                print(
                    f"round {rnd + 1} {c.name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                    f"{sample.rss:.0f} MiB, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if c.name not in correct:
                    base = src if c.tree == "main" else shipped_src
                    correct[c.name] = same_tree(dest / str(base).lstrip("/"), base, expected[c.tree])
            clean()
        # Peak RSS of R at the small archive, against R's at --size (above).
        small_rss = []
        if "R" in samples:
            r = next(c for c in chosen if c.name == "R")
            for _ in range(args.rounds):
                small_rss.append(run(r, key=skey)[0].rss)
        clean(last=True)
        if group:
            (WORK / f"corpus-ship-{size}" / "app" / "live.log").unlink(missing_ok=True)
    rows = [summarise(c.name, samples[c.name]) for c in chosen]
    for row in rows:
        row["correct"] = correct[row["name"]]
    by = {r["name"]: r for r in rows}

    def paired(x: str, y: str) -> list[float]:
        return [p.wall / q.wall for p, q in zip(samples[x], samples[y], strict=True)]

    def fmt(each: list[float]) -> str:
        return f"{statistics.median(each):.2f} ({min(each):.2f}–{max(each):.2f})"

    labels = {c.name: c.label for c in COMPETITORS}
    lines = [
        f"Corpus {args.size} ({size:,} bytes; benchmarks/corpus.py), archive {up:,} bytes; "
        f"{args.rounds} rounds interleaved, median (min–max); {os.cpu_count()} cores shared with "
        "other work; SeaweedFS on the same machine. CPU is user+sys of the restore's processes.",
        "",
        "| # | competitor | wall | CPU-seconds | peak RSS | all rounds (wall) | tree byte-identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = labels[r["name"]].replace("|", "\\|")
        lines.append(
            f"| {r['name']} | {label} | {r['wall']:.2f} s ({r['wall_min']:.2f}–{r['wall_max']:.2f}) | "
            f"{r['cpu']:.2f} s ({r['cpu_min']:.2f}–{r['cpu_max']:.2f}) | {r['rss']:.0f} MiB | "
            f"{', '.join(f'{w:.2f}' for w in r['walls'])} | {'yes' if r['correct'] else 'NO'} |"
        )
    ratios: list[str] = []
    verdict: dict[str, Any] = {}
    pipes = [p for p in ("P5", "PA") if p in by]
    if "R" in by and pipes:
        fastest = min(pipes, key=lambda p: by[p]["wall"])
        each = paired("R", fastest)
        verdict["wall_ratio"] = by["R"]["wall"] / by[fastest]["wall"]
        ratios.append(
            f"R / fastest pipeline ({fastest}) = {verdict['wall_ratio']:.2f} of the medians, per round "
            f"{fmt(each)} (target <= {WALL_TARGET})"
        )
    for v in ("RV", "RH"):
        if v in by and "R" in by:
            verdict[f"{v}_ratio"] = by[v]["wall"] / by["R"]["wall"]
            ratios.append(
                f"{v} / R = {verdict[f'{v}_ratio']:.2f}, per round {fmt(paired(v, 'R'))} "
                f"(target <= {VERIFY_TARGET})"
            )
    if small_rss:
        verdict["rss_ratio"] = by["R"]["rss"] / max(small_rss)
        ratios.append(
            f"R peak RSS {args.size} / {args.small} = {by['R']['rss']:.0f} / {max(small_rss):.0f} MiB "
            f"= {verdict['rss_ratio']:.2f} (target <= {RSS_TARGET}; {args.small} rounds: "
            f"{', '.join(f'{x:.0f}' for x in small_rss)} MiB)"
        )
    if "SL" in by and "S5" in by:
        verdict["shipped_ratio"] = by["SL"]["wall"] / by["S5"]["wall"]
        ratios.append(
            f"SL / S5 = {verdict['shipped_ratio']:.2f}, per round {fmt(paired('SL', 'S5'))} "
            f"(target <= {WALL_TARGET}); {len(keys)} objects"
        )
    if "SLV" in by and "SL" in by:
        verdict["shipped_verify_ratio"] = by["SLV"]["wall"] / by["SL"]["wall"]
        ratios.append(
            f"SLV / SL = {verdict['shipped_verify_ratio']:.2f}, per round {fmt(paired('SLV', 'SL'))} "
            f"(target <= {VERIFY_TARGET})"
        )
    stem = RESULTS / (f"restore-{args.size}" + (f"-only-{args.only}" if args.only else ""))
    lines += ["", *[f"- {r}" for r in ratios], "", f"![chart]({stem.with_suffix('.png').name})"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "small_rss_mib": small_rss, "objects": len(keys), **verdict}, indent=2)
        + "\n"
    )
    chart(rows, labels, stem.with_suffix(".png"))
    if not all(r["correct"] for r in rows):
        raise SystemExit("a competitor's tree differs from the source")


if __name__ == "__main__":
    main()
