"""The Sandbox API against the real kernel: namespaces, mounts, the init, errors, leaks."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from pytest_incarnate import PIPE, Overlay, Sandbox, Spec
from pytest_incarnate.errors import SandboxCrashed, SetupStepFailed

PY = sys.executable


def inside_facts() -> dict:
    """Runs inside a sandbox: what the payload sees."""
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    with open("/proc/net/dev") as f:
        ifaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    lo_flags = int(open("/sys/class/net/lo/flags").read(), 16) if os.path.exists("/sys/class/net/lo/flags") else None
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "pids": pids, "ifaces": ifaces, "lo_flags": lo_flags}


def test_inside_hostname_pids_and_loopback(leak_check):
    facts = Sandbox(Spec(hostname="inside-box")).call(inside_facts)
    assert facts["hostname"] == "inside-box" != socket.gethostname()
    assert facts["pid"] == 2
    assert facts["pids"] == [1, 2]
    assert facts["ifaces"] == ["lo"]
    # lo is up: a server on 127.0.0.1 inside answers a client inside.
    def echo() -> bytes:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        return conn.recv(4)
    assert Sandbox().call(echo) == b"ping"


def test_program_sees_only_its_own_pids(leak_check):
    r = Sandbox().run(["sh", "-c", 'echo $$; ls /proc | grep -E "^[0-9]+$" | sort -n | tr "\\n" " "'])
    assert r.returncode == 0, r.stderr
    first, pids = r.stdout.decode().splitlines()
    assert first == "2"
    assert pids.split()[:2] == ["1", "2"]  # 1 is the init, 2 the payload (then its own children)
    assert r.namespaces == ("user", "mount", "pid", "net", "uts", "ipc", "cgroup")
    assert r.degradations == ()


def test_read_only_root_and_binds(tmp_path, leak_check):
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    sb = Sandbox(Spec(binds=[(str(ro), "/tmp/data/ro", "ro"), (str(rw), "/tmp/data/rw")], copy_on_write=False))
    code = textwrap.dedent(
        """
        import errno, json, os
        out = {}
        for path in ("/etc/incarnate-probe", "/tmp/data/ro/x", "/tmp/data/rw/x", "/tmp/x"):
            try:
                with open(path, "w") as f:
                    f.write("hi")
                out[path] = "ok"
            except OSError as e:
                out[path] = errno.errorcode[e.errno]
        print(json.dumps(out))
        """
    )
    r = sb.run([PY, "-c", code])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {"/etc/incarnate-probe": "EROFS", "/tmp/data/ro/x": "EROFS", "/tmp/data/rw/x": "ok", "/tmp/x": "ok"}
    assert (rw / "x").read_text() == "hi"  # the read-write bind reaches the host
    assert not os.path.exists("/etc/incarnate-probe")
    assert not (ro / "x").exists()


def test_bind_onto_a_missing_target_in_the_read_only_root(tmp_path, leak_check):
    with pytest.raises(SetupStepFailed) as exc:
        Sandbox(Spec(binds=[(str(tmp_path), "/no-such-top-level-dir")], copy_on_write=False)).run(["/bin/true"])
    assert (exc.value.step, exc.value.errno) == ("bind", errno.EROFS)
    assert "onto /no-such-top-level-dir" in str(exc.value) and "under a tmpfs" in str(exc.value)
    assert not os.path.exists("/no-such-top-level-dir")


def test_host_processes_cannot_be_signalled(leak_check):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        def attack(pid: int) -> str:
            try:
                os.kill(pid, signal.SIGKILL)
                return "sent"
            except OSError as e:
                return errno.errorcode[e.errno]
        assert victim.pid > 2
        assert Sandbox().call(attack, victim.pid) == "ESRCH"
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_hundred_sandboxes_leave_nothing(leak_check):
    sb = Sandbox()
    for _ in range(100):
        assert sb.run(["/bin/true"]).returncode == 0
    for _ in range(20):
        assert sb.call(os.getpid) == 2


def test_setup_step_failures_are_typed(tmp_path, leak_check):
    with pytest.raises(SetupStepFailed) as exc:
        Sandbox(Spec(binds=[(str(tmp_path / "missing"), "/x")])).run(["/bin/true"])
    assert exc.value.step == "bind"
    assert exc.value.errno == errno.ENOENT
    assert exc.value.path == str(tmp_path / "missing")
    assert "bind" in str(exc.value) and "ENOENT" in str(exc.value)

    ov = Overlay("/mnt", [str(tmp_path / "nolower")], str(tmp_path / "u"), str(tmp_path / "w"))
    with pytest.raises(SetupStepFailed) as exc:
        Sandbox(Spec(overlays=[ov])).run(["/bin/true"])
    assert exc.value.step == "mount-overlay"
    assert exc.value.errno == errno.ENOENT
    assert exc.value.path == "/mnt"

    with pytest.raises(SetupStepFailed) as exc:
        Sandbox(Spec(cwd="/no/such/dir")).call(os.getcwd)
    assert (exc.value.step, exc.value.errno) == ("chdir", errno.ENOENT)


def test_overlay_operation(tmp_path, leak_check):
    lower1, lower2, upper, work = (tmp_path / n for n in ("l1", "l2", "upper", "work"))
    for d in (lower1, lower2, upper, work):
        d.mkdir()
    (lower1 / "top").write_text("from l1")
    (lower2 / "top").write_text("from l2")
    (lower2 / "below").write_text("from l2")
    sb = Sandbox(Spec(overlays=[Overlay("/tmp/ovl", [str(lower1), str(lower2)], str(upper), str(work))]))
    r = sb.run(["sh", "-c", "cat /tmp/ovl/top /tmp/ovl/below; echo new > /tmp/ovl/created; rm /tmp/ovl/below"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"from l1from l2"
    assert (upper / "created").read_text() == "new\n"
    assert (lower2 / "below").exists()  # deleted only in the overlay (a whiteout in upper)
    assert os.path.exists(upper / "below") and os.stat(upper / "below").st_rdev == 0


def test_exit_status_signal_and_pid1_forwarding(leak_check):
    sb = Sandbox()
    assert sb.run(["sh", "-c", "exit 7"]).returncode == 7
    r = sb.run(["sh", "-c", "kill -KILL $$"])
    assert (r.returncode, r.signal) == (-9, 9)
    code = (
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n"
        "print('ready', flush=True)\n"
        "signal.sigwait([signal.SIGTERM])\n"
        "sys.exit(42)\n"
    )
    h = sb.spawn([PY, "-c", code], stdout=PIPE)
    assert h.pid > 0 and h.pidfd >= 0
    assert h.stdout.readline() == b"ready\n"
    h.terminate()  # to the init, which forwards it to the payload
    assert h.wait(timeout=10) == 42
    h.stdout.close()


def test_background_children_die_with_the_payload(leak_check):
    r = Sandbox().run(["sh", "-c", "sleep 1000 & sleep 1000 & echo $!"])
    assert r.returncode == 0
    # The init exited with the payload; the kernel killed the rest before the wait returned.
    assert leak_check().descendants == 0


def test_timeout_kills_the_whole_sandbox(leak_check):
    r = Sandbox().run(["sh", "-c", "sleep 1000 & sleep 1000"], timeout=0.3)
    assert r.timed_out and r.signal == signal.SIGKILL
    assert not r.ok


def test_communicate_env_cwd_and_uid(tmp_path, leak_check):
    sb = Sandbox(Spec(env={"ONLY": "this", "PATH": "/usr/bin:/bin"}, cwd="/usr", uid=65534, gid=65534))
    r = sb.run(["sh", "-c", "cat; env | sort; pwd; id -u; id -g"], input=b"stdin-data\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "stdin-data"
    assert "ONLY=this" in lines and not any(line.startswith("HOME=") for line in lines)
    assert lines[-3:] == ["/usr", "65534", "65534"]


def test_fds_are_closed_except_pass_fds(leak_check):
    keep = os.open("/dev/null", os.O_RDONLY)
    stray = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(keep, True)
    os.set_inheritable(stray, True)
    try:
        h = Sandbox().spawn(["sh", "-c", "ls /proc/self/fd"], stdout=PIPE, pass_fds=[keep])
        out, _ = h.communicate()
        fds = {int(x) for x in out.split()}
        assert keep in fds
        assert stray not in fds
    finally:
        os.close(keep)
        os.close(stray)


def test_clone_fallback_without_clone3(leak_check):
    sb = Sandbox(Spec(hostname="legacy"))
    sb._use_clone3 = False  # test hook: go straight to clone(2), as on a kernel without clone3
    h = sb.spawn(["hostname"], stdout=PIPE)
    out, _ = h.communicate()
    assert out == b"legacy\n"
    assert h.used_clone3 is False
    h2 = Sandbox().spawn(["/bin/true"])
    h2.wait()
    assert h2.used_clone3 is True


def test_call_returns_and_raises(leak_check):
    sb = Sandbox()
    assert sb.call(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        sb.call(lambda: 1 / 0)
    with pytest.raises(SandboxCrashed) as exc:
        sb.call(os._exit, 3)
    assert exc.value.returncode == 3
    with pytest.raises(SandboxCrashed) as exc:
        sb.call(os.kill, 2, signal.SIGKILL)
    assert exc.value.signal == signal.SIGKILL
    assert "SIGKILL" in str(exc.value)
    with pytest.raises(SandboxCrashed, match="cannot be pickled"):
        sb.call(lambda: (lambda: 0))


def test_sandbox_dies_with_its_parent(tmp_path, leak_check):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(
        """
        import os, sys
        from pytest_incarnate import Sandbox, PIPE
        h = Sandbox().spawn(["sh", "-c", "echo up; exec sleep 1000"], stdout=PIPE)
        assert h.stdout.readline() == b"up\\n"
        print(h.pid, flush=True)
        os._exit(0)  # the parent dies without cleaning up
        """
    ))
    out = subprocess.run([PY, str(script)], capture_output=True, check=True, text=True).stdout
    init_pid = int(out)
    try:
        pidfd = os.pidfd_open(init_pid)
    except ProcessLookupError:
        return  # already gone
    try:
        ready, _, _ = select.select([pidfd], [], [], 10)
        assert ready, "the sandbox outlived its parent"
    finally:
        os.close(pidfd)


def test_spawn_from_a_thread_outlives_the_thread(leak_check):
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(h=Sandbox().spawn(["sh", "-c", "read x; exit 3"], stdin=PIPE)))
    t.start()
    t.join()
    h = box["h"]
    h.stdin.write(b"go\n")
    h.stdin.close()
    assert h.wait(timeout=10) == 3  # not killed when the spawning thread ended


def test_stdio_redirections_do_not_cross(leak_check):
    r_out, w_out = os.pipe()
    try:
        h = Sandbox().spawn(["sh", "-c", "echo out; echo err >&2"], stdout=PIPE, stderr=w_out)
        out, _ = h.communicate()
        os.close(w_out)
        w_out = -1
        assert out == b"out\n"
        assert os.read(r_out, 100) == b"err\n"
    finally:
        os.close(r_out)
        if w_out >= 0:
            os.close(w_out)


def test_payload_gets_default_sigpipe(leak_check):
    # Python ignores SIGPIPE; the payload must not inherit that.
    r = Sandbox().run(["sh", "-c", "yes | head -c1 >/dev/null; exit ${PIPESTATUS:-0}"])
    assert r.returncode == 0 and b"Broken pipe" not in r.stderr


def test_sigchld_ignored_by_the_caller(leak_check):
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with pytest.raises(SandboxCrashed, match="reaped by someone else"):
            Sandbox().run(["false"], timeout=10)
    finally:
        signal.signal(signal.SIGCHLD, old)
    # With SIGCHLD back to default, the same command reports its real status.
    assert Sandbox().run(["false"]).returncode == 1


def test_drop_privileges_keeps_the_parent_death_signal(tmp_path, leak_check):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(
        """
        import os
        from pytest_incarnate import Sandbox, Spec, PIPE
        h = Sandbox(Spec(uid=65534, gid=65534)).spawn(["sh", "-c", "echo up; exec sleep 1000"], stdout=PIPE)
        assert h.stdout.readline() == b"up\\n"
        print(h.pid, flush=True)
        os._exit(0)
        """
    ))
    init_pid = int(subprocess.run([PY, str(script)], capture_output=True, check=True, text=True).stdout)
    try:
        pidfd = os.pidfd_open(init_pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], 10)
        assert ready, "the sandbox outlived its parent after dropping privileges"
    finally:
        os.close(pidfd)


def test_exception_that_cannot_be_rebuilt_still_reports(leak_check):
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}-{b}")

    def boom():
        raise Odd(1, 2)

    with pytest.raises(SandboxCrashed, match="Odd: 1-2"):
        Sandbox().call(boom)


def _core_spawn(ops):
    """The core alone: ``ops`` in a child without namespaces, then /bin/true; the Started,
    and the child's exit status."""
    from pytest_incarnate import _ffi

    started = _ffi.spawn(_ffi.Native(ns=(), ops=ops, use_init=False, exe="/bin/true", argv=["/bin/true"], envp=[]))
    try:
        _, status = os.waitpid(started.pid, 0)
    finally:
        os.close(started.pidfd)
    return started, status


def test_an_optional_op_whose_path_is_gone_is_skipped_with_its_dependents(tmp_path, leak_check):
    from pytest_incarnate._ffi import OPTIONAL, Op

    gone = str(tmp_path / "gone")
    started, status = _core_spawn([
        Op("chdir", a=gone + "/1", flags=OPTIONAL, dependents=2, path=gone + "/1"),
        Op("mkdir", a=str(tmp_path / "dependent"), ival=0o755),  # skipped with it
        Op("chdir", a=gone + "/2", path=gone + "/2"),             # skipped with it (else fatal)
        Op("mkdir", a=str(tmp_path / "after"), ival=0o755),       # runs
        Op("chdir", a=gone + "/3", flags=OPTIONAL, path=gone + "/3"),
        Op("chdir", a=gone + "/4", flags=OPTIONAL, dependents=99, path=gone + "/4"),  # past the end: the rest
    ])
    assert os.waitstatus_to_exitcode(status) == 0
    assert started.skipped == (gone + "/1", gone + "/3", gone + "/4")
    assert sorted(os.listdir(tmp_path)) == ["after"]


def test_an_optional_op_fails_on_another_errno_and_a_required_one_on_enoent(tmp_path, leak_check):
    from pytest_incarnate._ffi import OPTIONAL, Op

    a_file = tmp_path / "file"
    a_file.write_text("")
    for op, err in ((Op("chdir", a=str(a_file), flags=OPTIONAL, path=str(a_file)), errno.ENOTDIR),
                    (Op("chdir", a=str(tmp_path / "gone"), path="gone"), errno.ENOENT)):
        with pytest.raises(SetupStepFailed) as exc:
            _core_spawn([op])
        assert (exc.value.step, exc.value.errno, exc.value.path) == ("chdir", err, op.path)


def _interrupt_when_readable(fd: int, main: int, timeout: float = 60.0) -> None:
    """In a thread: once ``fd`` is readable (the payload says it runs), SIGINT the main thread,
    whose default handler raises KeyboardInterrupt there.  Nothing sent if it never becomes
    readable: the test then fails on its own (DID NOT RAISE, after the sandbox's timeout)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        signal.pthread_kill(main, signal.SIGINT)


def _frame_local(tb, function: str, name: str):
    """A local variable of ``function``'s frame in a traceback (kept alive by it)."""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return tb.tb_frame.f_locals[name]
        tb = tb.tb_next
    raise AssertionError(f"no frame of {function} in the traceback")


@pytest.mark.parametrize("how", ["run", "communicate"])
def test_an_interrupt_in_communicate_kills_and_reaps_the_sandbox(how, tmp_path, leak_check):
    """KeyboardInterrupt while Sandbox.run (or Handle.communicate) waits on a payload that
    would run for ever: the sandbox is killed and reaped before the interrupt goes on; no
    process, descriptor or pipe is left, while its Handle is still referenced (not left to
    the garbage collector)."""
    import threading

    os.mkfifo(tmp_path / "running")
    before = leak_check()
    sb = Sandbox(Spec(binds=[(str(tmp_path), "/tmp/sig")], copy_on_write=False, timeout=60))
    # The payload reads its input, so the caller is inside communicate when it says (through
    # the FIFO) that it runs.
    argv = ["sh", "-c", "read x; echo running > /tmp/sig/running; exec sleep 1000"]
    fifo = os.open(tmp_path / "running", os.O_RDONLY | os.O_NONBLOCK)
    thread = threading.Thread(target=_interrupt_when_readable, args=(fifo, threading.main_thread().ident))
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt) as exc:
            if how == "run":
                sb.run(argv, input=b"go\n")
            else:
                h = sb.spawn(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE)
                h.communicate(b"go\n", timeout=60)
    finally:
        thread.join()
        signal.signal(signal.SIGINT, old)
        os.close(fifo)
    if how == "run":
        h = _frame_local(exc.value.__traceback__, "run", "h")
    assert h.returncode == -signal.SIGKILL  # killed, then reaped
    assert h.pidfd == -1 and all(f is None or f.closed for f in (h.stdin, h.stdout, h.stderr))
    after = leak_check()
    assert after.descendants == before.descendants, "sandbox processes left behind"
    assert after.fds == before.fds, f"descriptors left: {sorted(os.listdir('/proc/self/fd'))}"


def test_an_interrupt_during_a_call_kills_and_reaps_the_sandbox(leak_check):
    """KeyboardInterrupt while Sandbox.call waits for a callable that would not return: the
    whole sandbox (monitor, init, payload) is killed, and gone, before the interrupt goes on,
    instead of the interrupt waiting for the call to end."""
    import threading

    before = leak_check()
    running_r, running_w = os.pipe()
    gate_r, gate_w = os.pipe()  # the callable returns once something is written here
    done = threading.Event()
    stuck = []

    def wait_for_the_gate() -> None:
        os.write(running_w, b"running")
        os.read(gate_r, 1)

    def interrupter() -> None:
        _interrupt_when_readable(running_r, threading.main_thread().ident)
        if not done.wait(30):  # a watchdog: the interrupt has not come back
            stuck.append(True)
            os.write(gate_w, b"x")  # let the call end, so that the test fails instead of hanging

    thread = threading.Thread(target=interrupter)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            Sandbox(Spec(timeout=60)).call(wait_for_the_gate)
        done.set()
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGINT, old)
        for fd in (running_r, running_w, gate_r, gate_w):
            os.close(fd)
    assert not stuck, "the interrupt waited for the sandboxed call to end"
    after = leak_check()
    assert after.descendants == before.descendants, "sandbox processes left behind"
    assert after.fds == before.fds, f"descriptors left: {sorted(os.listdir('/proc/self/fd'))}"
