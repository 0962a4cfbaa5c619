"""The watcher in process: a fake IMDS, the functional world's fakes, and a stop signal sent
to this very process once the watcher has answered (its signal handling is its public way to
stop; nothing is spawned and no server runs).

`Watcher.run()` installs its handlers in the main thread, where pytest runs the test; the
signal is sent from a helper thread as soon as the notifier says the watcher is back to
watching (or a job is where the test wants it), never after a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from functional.conftest import World, no_backup, the_backup, the_message
from instance_agent.poller import LIFECYCLE_PATH, REBALANCE_PATH, SPOT_PATH
from instance_agent.sdnotify import Notifier
from instance_agent.status import status_path
from instance_agent.watch import Deps, Watcher

GIVE_UP = 20.0  # real seconds: only a broken test waits this long


class FakeIMDS:
    """What the poller reads: a path's text, or None for a 404."""

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers = answers
        self.closed = False

    def get(self, path: str, *, timeout: float = 10.0) -> str | None:
        return self.answers.get(path)

    def close(self) -> None:
        self.closed = True


class RecordingNotifier(Notifier):
    """sd_notify without a socket: what the watcher said, and an event per status text."""

    def __init__(self) -> None:
        super().__init__(env={})
        self.said: list[str] = []
        self.jobs_done = 0
        self.changed = threading.Condition()

    def notify(self, *assignments: str) -> bool:
        with self.changed:
            self.said.extend(assignments)
            if "STATUS=watching" in assignments and any(s.startswith("STATUS=backing up") for s in self.said):
                self.jobs_done = sum(1 for s in self.said if s.startswith("STATUS=backing up"))
            self.changed.notify_all()
        return False

    def poke(self) -> None:
        """Wake `wait_for` for something the watcher does not say (a fake's call)."""
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, ready: Callable[[], bool]) -> bool:
        with self.changed:
            return self.changed.wait_for(ready, timeout=GIVE_UP)


@pytest.fixture
def no_stray_sigterm() -> Iterator[None]:
    """SIGTERM does nothing outside Watcher.run, so a signal can never end pytest."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch_until(
    world: World,
    answers: dict[str, str | None],
    stop_when: Callable[[RecordingNotifier], bool],
    started: list[Watcher] | None = None,
    notifier: RecordingNotifier | None = None,
    **configure: Any,
) -> tuple[int, RecordingNotifier, FakeIMDS]:
    """Run the watcher until `stop_when(notifier)`, then SIGTERM it; its exit code."""
    world.configure(**configure)
    imds = FakeIMDS(answers)
    notifier = notifier or RecordingNotifier()
    deps = Deps(resolve_identity=lambda _cfg: world.ident, make_clients=lambda _cfg, _region: world.clients())
    # Watcher's `imds` is typed as the real client; the poller needs only MetadataReader.
    watcher = Watcher(world.cfg, deps, imds=imds, notifier=notifier)  # type: ignore[arg-type]
    if started is not None:
        started.append(watcher)

    def stopper() -> None:
        notifier.wait_for(lambda: stop_when(notifier))
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=stopper, name="stopper", daemon=True)
    thread.start()
    code = watcher.run()
    thread.join(GIVE_UP)
    return code, notifier, imds


def after_jobs(n: int) -> Callable[[RecordingNotifier], bool]:
    return lambda notifier: notifier.jobs_done >= n


def watching(notifier: RecordingNotifier) -> bool:
    return "READY=1" in notifier.said


pytestmark = pytest.mark.usefixtures("no_stray_sigterm")


def test_an_idle_watcher_stops_at_once_and_does_nothing(world: World) -> None:
    code, notifier, imds = watch_until(world, {LIFECYCLE_PATH: "InService"}, watching)
    assert code == 0
    assert "STOPPING=1" in notifier.said
    assert imds.closed
    no_backup(world)
    assert world.messages() == []


def test_imds_terminated_backs_up_completes_continue_once_and_records(world: World) -> None:
    world.asg.set_state("Terminating:Wait")
    code, _, _ = watch_until(world, {LIFECYCLE_PATH: "Terminated"}, after_jobs(1))
    assert code == 0
    key = the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    msg = the_message(world)
    assert (msg["trigger"], msg["status"], msg["key"]) == ("termination", "succeeded", key)
    assert world.record() is not None


def test_the_status_file_says_how_the_last_backup_went(world: World) -> None:
    world.asg.set_state("Terminating:Wait")
    watch_until(world, {LIFECYCLE_PATH: "Terminated"}, after_jobs(1))
    status = json.loads(Path(status_path(world.cfg)).read_text())
    assert status["imds_state"] == "Terminated"
    assert status["last_backup"]["status"] == "succeeded"
    assert status["last_backup"]["exit_code"] == 0


def test_a_launch_into_the_warm_pool_does_nothing(world: World) -> None:
    world.asg.set_state("Warmed:Pending:Wait")
    world.asg.live = False  # a launching hook holds it, not ours
    code, _, _ = watch_until(world, {LIFECYCLE_PATH: "Warmed:Stopped"}, after_jobs(1))
    assert code == 0
    no_backup(world)
    assert world.messages() == []
    assert world.asg.count("CompleteLifecycleAction") == 0


def test_a_return_to_the_warm_pool_completes_continue_without_a_backup(world: World) -> None:
    world.asg.set_state("Warmed:Pending:Wait")
    code, _, _ = watch_until(world, {LIFECYCLE_PATH: "Warmed:Stopped"}, after_jobs(1))
    assert code == 0
    no_backup(world)
    assert world.asg.completed == ["CONTINUE"]


def test_a_spot_reclaim_notice_backs_up_and_records_with_nothing_completed(world: World) -> None:
    world.asg.set_state("InService")
    notice = json.dumps({"action": "terminate", "time": "2026-12-04T22:00:00Z"})
    code, _, _ = watch_until(world, {LIFECYCLE_PATH: None, SPOT_PATH: notice}, after_jobs(1), spot=True)
    assert code == 0
    the_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 0
    assert the_message(world)["trigger"] == "spot-terminate"
    record = world.record()
    assert record is not None and record["completed"] is False


def test_a_rebalance_recommendation_with_on_rebalance_log_does_nothing(world: World) -> None:
    answers = {LIFECYCLE_PATH: None, REBALANCE_PATH: json.dumps({"noticeTime": "2026-12-04T22:00:00Z"})}
    code, notifier, _ = watch_until(world, answers, watching, spot=True, on_rebalance="log")
    assert code == 0
    no_backup(world)
    assert not any(s.startswith("STATUS=backing up") for s in notifier.said)


def test_a_rebalance_recommendation_with_on_rebalance_backup_backs_up_only(world: World) -> None:
    world.asg.set_state("InService")
    answers = {LIFECYCLE_PATH: None, REBALANCE_PATH: json.dumps({"noticeTime": "2026-12-04T22:00:00Z"})}
    code, _, _ = watch_until(world, answers, after_jobs(1), spot=True, on_rebalance="backup")
    assert code == 0
    the_backup(world)
    assert world.record() is None
    assert world.asg.count("CompleteLifecycleAction") == 0


def test_a_stop_during_the_backup_cancels_it_after_the_grace_and_completes_abandon(world: World) -> None:
    world.asg.set_state("Terminating:Wait")
    uploading = threading.Event()
    watchers: list[Watcher] = []
    notifier = RecordingNotifier()

    def upload_starts() -> None:
        # The backup is under way when SIGTERM comes: it runs until --stop-grace is over.
        uploading.set()
        notifier.poke()
        job = watchers[0].job
        assert job is not None and job.cancel.wait(GIVE_UP)

    world.s3.before["CreateMultipartUpload"] = upload_starts
    code, notifier, _ = watch_until(
        world,
        {LIFECYCLE_PATH: "Terminated"},
        lambda _n: uploading.is_set(),
        watchers,
        notifier,
        stop_grace=0.0,
    )
    assert code == 1  # the stop cut a backup short
    no_backup(world)
    assert world.asg.completed == ["ABANDON"]  # never left hanging for the heartbeat timeout
    msg = the_message(world)
    assert (msg["status"], msg["lifecycle_result"]) == ("failed", "ABANDON")
    assert "STOPPING=1" in notifier.said


def test_a_termination_and_a_spot_reclaim_together_run_the_termination_first_and_back_up_once(
    world: World,
) -> None:
    world.asg.set_state("Terminating:Wait")
    notice = json.dumps({"action": "terminate", "time": "2026-12-04T22:00:00Z"})
    code, _, _ = watch_until(
        world, {LIFECYCLE_PATH: "Terminated", SPOT_PATH: notice}, after_jobs(2), spot=True
    )
    assert code == 0
    key = the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    msg = the_message(world)  # the reclaim that followed was a duplicate: no second report
    assert (msg["trigger"], msg["key"]) == ("termination", key)


def test_leaving_a_running_warm_pool_answers_the_launching_action_once(world: World) -> None:
    """Out of a Running pool there is no boot, so no unit runs the launch gate: the watcher
    sees IMDS go from Warmed:Running to InService and answers the launching wait itself."""
    world.asg.set_state("Warmed:Running")  # parked: no action of ours for the warm-pool notice
    world.asg.live = False
    answered: list[tuple[str, str]] = []
    notifier = RecordingNotifier()
    answers: dict[str, str | None] = {LIFECYCLE_PATH: "Warmed:Running"}

    def leave_the_pool() -> None:
        notifier.wait_for(lambda: after_jobs(1)(notifier))  # the warm-pool notice found nothing to do
        answers[LIFECYCLE_PATH] = "InService"

    def answer(cfg: Any, identity: Any) -> None:
        answered.append((identity.instance_id, cfg.bucket))
        notifier.poke()

    world.configure(poll_interval=0.05)
    deps = Deps(
        resolve_identity=lambda _cfg: world.ident,
        make_clients=lambda _cfg, _region: world.clients(),
        answer_launch=answer,
    )
    imds = FakeIMDS(answers)
    watcher = Watcher(world.cfg, deps, imds=imds, notifier=notifier)  # type: ignore[arg-type]
    threading.Thread(target=leave_the_pool, daemon=True).start()

    def stopper() -> None:
        notifier.wait_for(lambda: bool(answered))
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    assert watcher.run() == 0
    thread.join(GIVE_UP)
    assert answered == [(world.ident.instance_id, world.cfg.bucket)]
    no_backup(world)
    assert world.messages() == []
    assert world.asg.count("CompleteLifecycleAction") == 0
